//! The forward process `x_0 → x_t` of block diffusion (docs/bd3lm.md §1.2, §1.5, §1.6).
//!
//! Each token of block `b` is masked independently with probability
//! `p = mask_prob(t_b)`: token `ℓ` is masked iff its uniform `u_ℓ ≤ p`, as the
//! reference does. With a clip range, a block whose realised masked fraction
//! falls outside the bounds of [`ClipRange::resample_bounds`](crate::schedule::ClipRange::resample_bounds) is redrawn with
//! fresh uniforms and the same `t` until it fits. Pinned positions (BOS,
//! prompts) are restored afterwards, so they are never masked; as in the
//! reference, the bounds are checked before that restoration.

use crate::rng::RngStream;
use crate::schedule::TrainingSchedule;
use crate::{error::invalid, Error};

/// How many redraws of one block are tried before giving up.
pub const MAX_RESAMPLE_TRIES: u32 = 1000;

/// Masks a batch of sequences.
///
/// - `x0`: clean tokens, `[batch, seq_len]`;
/// - `times`: one `t` per (sequence, block), `[batch, seq_len / block_size]`
///   (from [`crate::schedule::stratified_times`]);
/// - `pinned(seq, pos)`: positions never masked (position 0 for BOS);
/// - `stream`: uniforms at `(row = seq, index = try·seq_len + pos)`; use
///   [`crate::rng::Purpose::Noise`] with the training step;
/// - `xt`: written with `x0` or `mask_id`.
///
/// Returns the number of masked tokens.
///
/// ```
/// use did_core::noise::mask_tokens;
/// use did_core::rng::{Purpose, RngStream};
/// use did_core::schedule::TrainingSchedule;
/// let x0 = [50256, 11, 12, 13, 14, 15, 16, 17];
/// let mut xt = [0; 8];
/// let s = RngStream::new(1, Purpose::Noise, 0, 0);
/// let n = mask_tokens(&x0, 8, 4, &[1.0, 1.0], &TrainingSchedule::default(), &|_, p| p == 0, &s, 50257, &mut xt)?;
/// assert_eq!(n, 7); // t = 1 masks everything but the pinned BOS
/// assert_eq!(xt[0], 50256);
/// # Ok::<(), did_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn mask_tokens(
    x0: &[u32],
    seq_len: usize,
    block_size: usize,
    times: &[f64],
    schedule: &TrainingSchedule,
    pinned: &dyn Fn(usize, usize) -> bool,
    stream: &RngStream,
    mask_id: u32,
    xt: &mut [u32],
) -> Result<usize, Error> {
    if block_size == 0 || seq_len == 0 || seq_len % block_size != 0 {
        return Err(invalid(
            "block size",
            alloc::format!("block size {block_size} must divide the sequence length {seq_len}"),
        ));
    }
    if x0.len() % seq_len != 0 || xt.len() != x0.len() {
        return Err(invalid(
            "token buffer",
            "x0 and xt must both hold batch × seq_len tokens",
        ));
    }
    let blocks = seq_len / block_size;
    let batch = x0.len() / seq_len;
    if times.len() != batch * blocks {
        return Err(invalid(
            "times",
            alloc::format!(
                "need one time per (sequence, block): {} values, got {}",
                batch * blocks,
                times.len()
            ),
        ));
    }
    let clip = schedule.clip;
    if !clip.admits_block_size(block_size) {
        return Err(invalid(
            "clip range",
            alloc::format!(
                "no masked count of a {block_size}-token block lies in [{}, {}]; widen the range",
                clip.lo(),
                clip.hi()
            ),
        ));
    }
    let mut total = 0;
    for seq in 0..batch {
        for blk in 0..blocks {
            let p = schedule.mask_prob(times[seq * blocks + blk]);
            let span = seq * seq_len + blk * block_size..seq * seq_len + (blk + 1) * block_size;
            let mut tries = 0u32;
            loop {
                let mut count = 0;
                for (i, pos) in span.clone().enumerate() {
                    let index = tries as usize * seq_len + blk * block_size + i;
                    let masked = stream.uniform(seq as u32, index as u32) <= p;
                    xt[pos] = if masked { mask_id } else { x0[pos] };
                    count += usize::from(masked);
                }
                if clip.accepts_count(count, block_size) {
                    break;
                }
                tries += 1;
                if tries >= MAX_RESAMPLE_TRIES {
                    return Err(Error::ResampleExhausted { block: blk, tries });
                }
            }
            for (i, pos) in span.enumerate() {
                if pinned(seq, blk * block_size + i) {
                    xt[pos] = x0[pos];
                }
                total += usize::from(xt[pos] == mask_id);
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Purpose;
    use crate::schedule::{stratified_times, ClipRange, MaskSchedule};
    use alloc::vec;
    use quickcheck::quickcheck;

    const MASK: u32 = 99;

    #[test]
    fn masked_fraction_follows_t() {
        let (l, b) = (4096, 4096);
        let x0 = vec![1u32; l];
        let mut xt = vec![0u32; l];
        let s = RngStream::new(3, Purpose::Noise, 0, 0);
        let n = mask_tokens(
            &x0,
            l,
            b,
            &[0.3],
            &TrainingSchedule::default(),
            &|_, _| false,
            &s,
            MASK,
            &mut xt,
        )
        .unwrap();
        assert!((n as f64 / l as f64 - 0.3).abs() < 0.03, "{n}");
    }

    #[test]
    fn impossible_clip_is_an_error_not_a_hang() {
        let sched =
            TrainingSchedule::new(MaskSchedule::Linear, ClipRange::new(0.3, 0.8).unwrap()).unwrap();
        let mut xt = [0u32; 1];
        let r = mask_tokens(
            &[1],
            1,
            1,
            &[0.5],
            &sched,
            &|_, _| false,
            &RngStream::new(0, Purpose::Noise, 0, 0),
            MASK,
            &mut xt,
        );
        assert!(r.is_err());
    }

    quickcheck! {
        fn resampled_blocks_respect_the_clip(seed: u64, lo: u8, blocks: u8) -> bool {
            let (block, nblocks, batch) = (4usize, usize::from(blocks % 16) + 1, 3usize);
            let lo = [0.3, 0.45, 0.5][usize::from(lo % 3)];
            let clip = ClipRange::new(lo, lo + 0.5).unwrap();
            let sched = TrainingSchedule::new(MaskSchedule::Linear, clip).unwrap();
            let l = block * nblocks;
            let x0: alloc::vec::Vec<u32> = (0..batch * l).map(|i| i as u32 % 50).collect();
            let mut t = vec![0.0; batch * nblocks];
            stratified_times(&RngStream::new(seed, Purpose::Time, 0, 0), batch, nblocks, clip, &mut t);
            let mut xt = vec![0u32; batch * l];
            if mask_tokens(&x0, l, block, &t, &sched, &|_, _| false, &RngStream::new(seed, Purpose::Noise, 0, 0), MASK, &mut xt).is_err() {
                return false;
            }
            xt.chunks(block).all(|c| {
                let n = c.iter().filter(|&&x| x == MASK).count();
                clip.accepts_count(n, block)
            })
        }

        fn pinned_positions_are_never_masked_and_others_keep_x0(seed: u64, prompt: u8) -> bool {
            let (l, b) = (32usize, 8usize);
            let prompt = usize::from(prompt % 32);
            let x0: alloc::vec::Vec<u32> = (0..2 * l).map(|i| 1000 + i as u32).collect();
            let mut t = vec![0.0; 2 * l / b];
            stratified_times(&RngStream::new(seed, Purpose::Time, 0, 0), 2, l / b, ClipRange::FULL, &mut t);
            let mut xt = vec![0u32; 2 * l];
            let pinned = |_: usize, pos: usize| pos == 0 || pos < prompt;
            mask_tokens(&x0, l, b, &t, &TrainingSchedule::default(), &pinned, &RngStream::new(seed, Purpose::Noise, 0, 0), MASK, &mut xt).unwrap();
            xt.iter().zip(&x0).enumerate().all(|(i, (&a, &c))| {
                let pos = i % l;
                if pinned(0, pos) { a == c } else { a == c || a == MASK }
            })
        }
    }
}
