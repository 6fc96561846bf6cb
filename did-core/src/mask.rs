//! Structural attention masks: a description that answers "may query `q`
//! attend to key `k`?" without a dense matrix.
//!
//! Every mask gives, for each query, at most two disjoint key ranges
//! ([`AttentionMask::key_ranges`]); queries in the same run
//! ([`AttentionMask::run_end`]) share them. Kernels use the ranges to visit
//! only allowed keys and [`AttentionMask::classify_tile`] to skip empty tiles
//! and drop the predicate in full ones. [`AttentionMask::to_dense`] exists for
//! tests only.
//!
//! ```
//! use did_core::mask::{AttentionMask, TileKind};
//! // BD3 training mask for L = 6, block 2 (docs/bd3lm.md §2.2): x_t is 0..6, x_0 is 6..12.
//! let m = AttentionMask::bd3_training(6, 2)?;
//! assert!(m.allows(2, 3));   // noisy block 1 sees itself,
//! assert!(m.allows(2, 6));   // and the earlier clean block,
//! assert!(!m.allows(2, 8));  // but never its own clean copy.
//! assert!(m.allows(8, 9) && !m.allows(8, 2)); // clean sees clean only.
//! assert_eq!(m.classify_tile(0..6, 6..12), TileKind::Partial);
//! assert_eq!(m.classify_tile(6..12, 0..6), TileKind::Empty);
//! # Ok::<(), did_core::Error>(())
//! ```

use alloc::vec::Vec;
use core::ops::Range;

use crate::{error::invalid, Error};

/// How a tile `[q0, q1) × [k0, k1)` of the attention matrix is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TileKind {
    /// No query of the tile may see any key of it: skip the tile.
    Empty,
    /// Every pair is allowed: no per-element predicate needed.
    Full,
    /// Some pairs allowed, some not: apply [`AttentionMask::allows`] element-wise.
    Partial,
}

/// The keys a query may attend to: up to two disjoint half-open ranges.
///
/// ```
/// use did_core::mask::AttentionMask;
/// let m = AttentionMask::bd3_training(8, 4)?;
/// // A noisy query in block 1 sees its noisy block and the clean block 0.
/// assert_eq!(m.key_ranges(5).ranges, [4..8, 8..12]);
/// assert_eq!(m.key_ranges(5).overlap(&(0..16)), 8);
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRanges {
    /// The ranges, disjoint and ascending; unused ones are empty.
    pub ranges: [Range<usize>; 2],
}

impl KeyRanges {
    fn one(r: Range<usize>) -> Self {
        KeyRanges { ranges: [r, 0..0] }
    }

    /// Whether key `k` is in one of the ranges.
    pub fn contains(&self, k: usize) -> bool {
        self.ranges.iter().any(|r| r.contains(&k))
    }

    /// How many keys of `keys` are allowed.
    pub fn overlap(&self, keys: &Range<usize>) -> usize {
        self.ranges
            .iter()
            .map(|r| r.end.min(keys.end).saturating_sub(r.start.max(keys.start)))
            .sum()
    }
}

/// An attention mask, described by its structure.
///
/// Query and key indices are positions in the arrays the attention sees. For
/// the inference masks, query `q` sits at absolute position `query_offset + q`
/// and key `k` at `key_offset + k`; blocks are aligned to absolute position 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMask {
    /// BD3-LM's vectorised training over `x_t ⊕ x_0` (`2·seq_len` queries and keys):
    /// block-diagonal ∪ offset-block-causal ∪ block-causal (docs/bd3lm.md §2.2).
    Bd3Training {
        /// `L`, the length of each half.
        seq_len: usize,
        /// `L'`; divides `seq_len`.
        block_size: usize,
    },
    /// Block-causal inference: a query sees every key of its own block and of
    /// earlier blocks, and, with a window, only the last `window` positions up
    /// to the end of its block (BD3-LM's sliding context).
    BlockCausal {
        /// The block size.
        block_size: usize,
        /// Absolute position of query 0 (the KV-cache length when only the block is queried).
        query_offset: usize,
        /// Absolute position of key 0 (the start of the cache window).
        key_offset: usize,
        /// At most this many positions ending at the end of the query's block; `None` for all.
        window: Option<usize>,
    },
    /// Every query sees every key (MDLM, a global refine block).
    Full,
    /// Causal (AR): a query sees keys at its own and earlier absolute positions.
    Causal {
        /// Absolute position of query 0.
        query_offset: usize,
        /// Absolute position of key 0.
        key_offset: usize,
        /// At most this many positions ending at the query; `None` for all.
        window: Option<usize>,
    },
}

impl AttentionMask {
    /// The BD3 training mask, checking that the block size divides the length.
    pub fn bd3_training(seq_len: usize, block_size: usize) -> Result<Self, Error> {
        check_block(seq_len, block_size)?;
        Ok(AttentionMask::Bd3Training {
            seq_len,
            block_size,
        })
    }

    /// Block-causal attention over a whole sequence (no cache, no window).
    pub fn block_causal(block_size: usize) -> Result<Self, Error> {
        if block_size == 0 {
            return Err(invalid("block size", "must be at least 1"));
        }
        Ok(AttentionMask::BlockCausal {
            block_size,
            query_offset: 0,
            key_offset: 0,
            window: None,
        })
    }

    /// Plain causal attention over a whole sequence.
    pub fn causal() -> Self {
        AttentionMask::Causal {
            query_offset: 0,
            key_offset: 0,
            window: None,
        }
    }

    /// The keys query `q` may attend to.
    pub fn key_ranges(&self, q: usize) -> KeyRanges {
        match *self {
            AttentionMask::Bd3Training {
                seq_len: l,
                block_size: b,
            } => {
                if q < l {
                    let blk = q / b;
                    KeyRanges {
                        ranges: [blk * b..((blk + 1) * b).min(l), l..l + blk * b],
                    }
                } else {
                    let blk = (q - l) / b;
                    KeyRanges::one(l..l + ((blk + 1) * b).min(l))
                }
            }
            AttentionMask::BlockCausal {
                block_size,
                query_offset,
                key_offset,
                window,
            } => {
                let end = ((query_offset + q) / block_size + 1) * block_size;
                let start = window.map_or(0, |w| end.saturating_sub(w));
                KeyRanges::one(start.saturating_sub(key_offset)..end.saturating_sub(key_offset))
            }
            AttentionMask::Full => KeyRanges::one(0..usize::MAX),
            AttentionMask::Causal {
                query_offset,
                key_offset,
                window,
            } => {
                let end = query_offset + q + 1;
                let start = window.map_or(0, |w| end.saturating_sub(w));
                KeyRanges::one(start.saturating_sub(key_offset)..end.saturating_sub(key_offset))
            }
        }
    }

    /// The first query after `q` whose key ranges may differ from `q`'s.
    pub fn run_end(&self, q: usize) -> usize {
        match *self {
            AttentionMask::Bd3Training {
                seq_len: l,
                block_size: b,
            } => {
                if q < l {
                    ((q / b + 1) * b).min(l)
                } else {
                    l + ((q - l) / b + 1) * b
                }
            }
            AttentionMask::BlockCausal {
                block_size,
                query_offset,
                ..
            } => ((query_offset + q) / block_size + 1) * block_size - query_offset,
            AttentionMask::Full => usize::MAX,
            AttentionMask::Causal { .. } => q + 1,
        }
    }

    /// Whether query `q` may attend to key `k`.
    pub fn allows(&self, q: usize, k: usize) -> bool {
        self.key_ranges(q).contains(k)
    }

    /// Classifies the tile `queries × keys`. Exact: it agrees with
    /// [`Self::allows`] on every pair. Costs one step per run of queries
    /// sharing their key ranges (per block for the block masks).
    pub fn classify_tile(&self, queries: Range<usize>, keys: Range<usize>) -> TileKind {
        if queries.is_empty() || keys.is_empty() {
            return TileKind::Empty;
        }
        let width = keys.end - keys.start;
        let (mut any_full, mut any_empty, mut any_partial) = (false, false, false);
        let mut q = queries.start;
        while q < queries.end {
            match self.key_ranges(q).overlap(&keys) {
                0 => any_empty = true,
                n if n == width => any_full = true,
                _ => any_partial = true,
            }
            if any_partial || (any_full && any_empty) {
                return TileKind::Partial;
            }
            q = self.run_end(q).max(q + 1);
        }
        if any_full {
            TileKind::Full
        } else {
            TileKind::Empty
        }
    }

    /// The dense `queries × keys` boolean matrix, row-major. Tests only: never on a hot path.
    pub fn to_dense(&self, queries: usize, keys: usize) -> Vec<bool> {
        let mut out = Vec::with_capacity(queries * keys);
        for q in 0..queries {
            let r = self.key_ranges(q);
            out.extend((0..keys).map(|k| r.contains(k)));
        }
        out
    }
}

pub(crate) fn check_block(seq_len: usize, block_size: usize) -> Result<(), Error> {
    if block_size == 0 || seq_len == 0 || seq_len % block_size != 0 {
        return Err(invalid(
            "block size",
            alloc::format!("block size {block_size} does not divide the sequence length {seq_len}; pick a divisor"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, TestResult};

    /// docs/bd3lm.md §2.2, written as the reference writes it.
    fn bd3_formula(l: usize, b: usize, q: usize, k: usize) -> bool {
        let (xq, xk) = (q >= l, k >= l);
        let bq = (q - if xq { l } else { 0 }) / b;
        let bk = (k - if xk { l } else { 0 }) / b;
        let block_diagonal = bq == bk && xq == xk;
        let offset_block_causal = !xq && xk && bk < bq;
        let block_causal = xq && xk && bk <= bq;
        block_diagonal || offset_block_causal || block_causal
    }

    fn masks(
        l: usize,
        b: usize,
        qo: usize,
        ko: usize,
        w: Option<usize>,
    ) -> Vec<(AttentionMask, usize, usize)> {
        vec![
            (
                AttentionMask::Bd3Training {
                    seq_len: l,
                    block_size: b,
                },
                2 * l,
                2 * l,
            ),
            (
                AttentionMask::BlockCausal {
                    block_size: b,
                    query_offset: qo,
                    key_offset: ko,
                    window: w,
                },
                l,
                l + qo,
            ),
            (AttentionMask::Full, l, l),
            (
                AttentionMask::Causal {
                    query_offset: qo,
                    key_offset: ko,
                    window: w,
                },
                l,
                l + qo,
            ),
        ]
    }

    #[test]
    fn bd3_example_from_the_reference() {
        // L = 6, L' = 2: noisy block (2,3) sees noisy 2,3 and clean 6,7; clean 8 sees 6..10.
        let m = AttentionMask::bd3_training(6, 2).unwrap();
        let row = |q| (0..12).filter(|&k| m.allows(q, k)).collect::<Vec<_>>();
        assert_eq!(row(2), vec![2, 3, 6, 7]);
        assert_eq!(row(8), vec![6, 7, 8, 9]);
        assert_eq!(row(0), vec![0, 1]);
    }

    #[test]
    fn block_causal_window_matches_bd3_sliding_context() {
        // Window 8, block 4: a query in block [8, 12) sees [4, 12).
        let m = AttentionMask::BlockCausal {
            block_size: 4,
            query_offset: 8,
            key_offset: 0,
            window: Some(8),
        };
        assert_eq!(m.key_ranges(1).ranges[0], 4..12);
        // With the cache shifted so key 0 is absolute 4, the same keys are 0..8.
        let m = AttentionMask::BlockCausal {
            block_size: 4,
            query_offset: 8,
            key_offset: 4,
            window: Some(8),
        };
        assert_eq!(m.key_ranges(1).ranges[0], 0..8);
    }

    quickcheck! {
        fn dense_bd3_equals_the_reference_formula(l_blocks: u8, b: u8) -> bool {
            let b = usize::from(b % 8) + 1;
            let l = b * (usize::from(l_blocks % 8) + 1);
            let m = AttentionMask::bd3_training(l, b).unwrap();
            let d = m.to_dense(2 * l, 2 * l);
            (0..2 * l).all(|q| (0..2 * l).all(|k| d[q * 2 * l + k] == bd3_formula(l, b, q, k)))
        }

        fn tiles_agree_with_brute_force(l_blocks: u8, b: u8, tq: u8, tk: u8, qo: u8, w: u8) -> TestResult {
            let b = usize::from(b % 9) + 1;
            let l = b * (usize::from(l_blocks % 6) + 1);
            let (tq, tk) = (usize::from(tq % 13) + 1, usize::from(tk % 13) + 1);
            let qo = usize::from(qo % 3) * b;
            let w = if w % 3 == 0 { None } else { Some(usize::from(w % 17) + 1) };
            for (m, nq, nk) in masks(l, b, qo, qo / 2, w) {
                for q0 in (0..nq).step_by(tq) {
                    for k0 in (0..nk).step_by(tk) {
                        let (q1, k1) = ((q0 + tq).min(nq), (k0 + tk).min(nk));
                        let n = (q1 - q0) * (k1 - k0);
                        let allowed = (q0..q1).flat_map(|q| (k0..k1).map(move |k| (q, k))).filter(|&(q, k)| m.allows(q, k)).count();
                        let want = if allowed == 0 { TileKind::Empty } else if allowed == n { TileKind::Full } else { TileKind::Partial };
                        if m.classify_tile(q0..q1, k0..k1) != want {
                            return TestResult::error(format!("{m:?} tile {q0}..{q1} x {k0}..{k1}"));
                        }
                    }
                }
            }
            TestResult::passed()
        }

        fn block_size_one_is_causal_and_block_l_is_full(l: u8) -> bool {
            let l = usize::from(l % 20) + 1;
            let bc1 = AttentionMask::block_causal(1).unwrap();
            let bcl = AttentionMask::block_causal(l).unwrap();
            let causal = AttentionMask::causal();
            (0..l).all(|q| (0..l).all(|k| bc1.allows(q, k) == causal.allows(q, k) && bcl.allows(q, k)))
        }

        fn kv_cached_queries_see_what_the_full_pass_sees(blocks: u8, b: u8) -> bool {
            // Querying only the last block with a cache must equal the last rows of the full pass.
            let b = usize::from(b % 8) + 1;
            let l = b * (usize::from(blocks % 6) + 1);
            let full = AttentionMask::block_causal(b).unwrap();
            let cached = AttentionMask::BlockCausal { block_size: b, query_offset: l - b, key_offset: 0, window: None };
            (0..b).all(|q| (0..l).all(|k| cached.allows(q, k) == full.allows(l - b + q, k)))
        }
    }

    #[test]
    fn bd3_training_rejects_non_divisors() {
        assert!(AttentionMask::bd3_training(10, 4).is_err());
        assert!(AttentionMask::bd3_training(8, 0).is_err());
    }
}
