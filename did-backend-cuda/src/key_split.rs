//! Splitting the flash forward's key tiles between blocks (flash-decoding): the host side of
//! `attention_forward_flash` launched with `gridDim.z > 1` and `attention_combine_splits`.
//!
//! The flash forward gives each (sequence, head, ≤ 64 queries) one block, which walks the key
//! tiles its mask reaches one after another. A draft call has one such query tile per
//! (sequence, head): at batch 1 that is 12 blocks of one warp on a GPU of 132 SMs, each walking
//! the whole KV cache (17 tiles at L = 1024) with one tile in flight. Splitting the tiles between
//! blocks puts the idle SMs to work on the same keys; each split leaves its rows' output
//! normalised over its own keys and their log-sum-exp, and one small kernel joins them
//! (≈ 256 bytes a row a split, in f32, so nothing is rounded to bf16 before the join).
//!
//! Results depend on the split (a sum in another order), never on timing: the split is a pure
//! function of the launch's shape and the device's SM count.

/// How [`CudaBackend`](crate::CudaBackend) splits the flash forward's key tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeySplit {
    /// Split where the launch would leave most SMs idle ([`tiles_per_split`]); the default.
    #[default]
    Auto,
    /// Never split: one block walks all of its key tiles.
    Off,
    /// At most this many key tiles a block (≥ 1), whatever the launch's size: for tests.
    TilesPerBlock(usize),
}

/// Blocks the policy aims for a launch: two per SM, so every SM has work and a second block to
/// switch to while one waits on its tile.
const BLOCKS_PER_SM: usize = 2;

/// The fewest key tiles worth splitting: a split costs one more launch (the combine, a few µs
/// between kernels) and saves about a tile's latency (≈ 1–2 µs with one tile in flight) for each
/// tile a block no longer walks, so two or three tiles stay whole. An estimate until a GPU
/// measures it (`examples/profile_ops`, "A draft call's attention forward").
pub const MIN_TILES_TO_SPLIT: usize = 4;

/// Key tiles each block of a flash forward visits, for a launch of `blocks` (query tiles ×
/// sequences × heads) over `tiles` key tiles on a GPU of `sms` SMs: `tiles` (no split) unless
/// the launch has fewer blocks than SMs and at least [`MIN_TILES_TO_SPLIT`] tiles, else the
/// fewest that still give about [`BLOCKS_PER_SM`] blocks an SM. No split is left without a tile: `tiles.div_ceil(result)`
/// blocks cover the tiles.
///
/// ```
/// use did_backend_cuda::key_split::{tiles_per_split, KeySplit};
/// // A batch-1 draft at L = 1024: 12 heads, 17 key tiles, an H200's 132 SMs: one tile a block.
/// assert_eq!(tiles_per_split(12, 17, 132, KeySplit::Auto), 1);
/// // Batch 8: 96 blocks already; three splits of six tiles.
/// assert_eq!(tiles_per_split(96, 17, 132, KeySplit::Auto), 6);
/// // A training pass fills the GPU by itself.
/// assert_eq!(tiles_per_split(3072, 32, 132, KeySplit::Auto), 32);
/// assert_eq!(tiles_per_split(12, 17, 132, KeySplit::Off), 17);
/// assert_eq!(tiles_per_split(3072, 32, 132, KeySplit::TilesPerBlock(5)), 5);
/// ```
pub fn tiles_per_split(blocks: usize, tiles: usize, sms: usize, split: KeySplit) -> usize {
    let tiles = tiles.max(1);
    match split {
        KeySplit::Off => tiles,
        KeySplit::TilesPerBlock(n) => n.clamp(1, tiles),
        KeySplit::Auto => {
            if blocks == 0 || blocks >= sms || tiles < MIN_TILES_TO_SPLIT {
                return tiles;
            }
            let splits = (BLOCKS_PER_SM * sms).div_ceil(blocks).min(tiles);
            tiles.div_ceil(splits)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, TestResult};

    quickcheck! {
        fn the_splits_cover_every_tile_and_none_is_empty(blocks: u16, tiles: u16, sms: u8, n: u8, kind: u8) -> TestResult {
            let (blocks, tiles, sms) = (blocks as usize, 1 + tiles as usize % 2048, 1 + sms as usize);
            let split = match kind % 3 {
                0 => KeySplit::Auto,
                1 => KeySplit::Off,
                _ => KeySplit::TilesPerBlock(n as usize),
            };
            let per = tiles_per_split(blocks, tiles, sms, split);
            let splits = tiles.div_ceil(per);
            // Every tile belongs to a split, and the last split starts before the last tile.
            TestResult::from_bool(per >= 1 && per <= tiles && splits * per >= tiles && (splits - 1) * per < tiles)
        }

        fn auto_never_splits_a_launch_that_fills_the_gpu(blocks: u16, tiles: u16, sms: u8) -> TestResult {
            let (tiles, sms) = (1 + tiles as usize, 1 + sms as usize);
            let blocks = sms + blocks as usize;
            TestResult::from_bool(tiles_per_split(blocks, tiles, sms, KeySplit::Auto) == tiles)
        }

        fn auto_gives_about_two_blocks_an_sm_where_the_tiles_allow(blocks: u8, tiles: u16, sms: u8) -> TestResult {
            let (sms, tiles) = (2 + sms as usize, MIN_TILES_TO_SPLIT + tiles as usize);
            let blocks = 1 + blocks as usize % (sms - 1);  // fewer than the SMs
            let splits = tiles.div_ceil(tiles_per_split(blocks, tiles, sms, KeySplit::Auto));
            let want = (2 * sms).div_ceil(blocks).min(tiles);
            // Rounding the tiles a split up may leave fewer splits, never fewer than half.
            TestResult::from_bool(splits <= want && 2 * splits >= want)
        }
    }

    #[test]
    fn a_batch_one_draft_spreads_its_cache_over_the_gpu() {
        // 12 heads at L = 1024 on 132 SMs: one tile a block, 17 × 12 = 204 blocks.
        assert_eq!(tiles_per_split(12, 17, 132, KeySplit::Auto), 1);
        // Early in the draft: a few tiles stay whole, four are split.
        assert_eq!(tiles_per_split(12, 3, 132, KeySplit::Auto), 3);
        assert_eq!(tiles_per_split(12, 4, 132, KeySplit::Auto), 1);
        // Forced, a tile a block, whatever the size.
        assert_eq!(tiles_per_split(12, 2, 132, KeySplit::TilesPerBlock(1)), 1);
        // Batch 64: 768 blocks, no split.
        assert_eq!(tiles_per_split(768, 17, 132, KeySplit::Auto), 17);
        // A one-tile cache is never split.
        assert_eq!(tiles_per_split(1, 1, 132, KeySplit::Auto), 1);
    }
}
