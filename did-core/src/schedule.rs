//! Masking schedules, the NELBO weight, stratified time sampling, and the
//! clip-range search of BD3-LM (docs/bd3lm.md §1.3–§1.6).
//!
//! A training step draws one time `t` per (sequence, block), masks each token
//! of the block with probability [`MaskSchedule::mask_prob`]`(t)`, and weights
//! the cross-entropy of the masked tokens by [`TrainingSchedule::loss_weight`]`(t)`.

use alloc::vec::Vec;
use core::f64::consts::PI;

use crate::error::invalid;
use crate::rng::RngStream;
use crate::Error;

/// ε of the linear schedule: the smallest `t` drawn, so the weight `1/t` stays finite.
pub const EPS: f64 = 1e-3;

/// How the mask probability grows with `t ∈ [0, 1]`.
///
/// ```
/// use did_core::schedule::MaskSchedule;
/// assert_eq!(MaskSchedule::Linear.mask_prob(0.3), 0.3);
/// assert!((MaskSchedule::Linear.loss_weight(0.25) - 4.0).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum MaskSchedule {
    /// `1 − α_t = t`, weight `1/t`. BD3-LM calls it "loglinear"; it is what the paper trains with.
    #[default]
    Linear,
    /// `1 − α_t = 1 − (1 − ε)·cos(πt/2)` (BD3-LM Table 8 ablation).
    Cosine,
}

impl MaskSchedule {
    /// The probability that a token is masked at time `t`.
    pub fn mask_prob(self, t: f64) -> f64 {
        match self {
            MaskSchedule::Linear => t,
            MaskSchedule::Cosine => 1.0 - (1.0 - EPS) * libm::cos(PI * t / 2.0),
        }
    }

    /// The NELBO weight `−α'_t / (1 − α_t)` (positive) of a masked token's cross-entropy.
    pub fn loss_weight(self, t: f64) -> f64 {
        match self {
            MaskSchedule::Linear => 1.0 / t,
            MaskSchedule::Cosine => {
                let p = self.mask_prob(t);
                (1.0 - EPS) * libm::sin(PI * t / 2.0) * (PI / 2.0) / (p + EPS)
            }
        }
    }
}

/// The interval `[lo, hi]` that training times are drawn from (BD3-LM's clipped
/// schedule `U[β, ω]`); `(1e-3, 1)` is the unclipped NELBO.
///
/// ```
/// use did_core::schedule::ClipRange;
/// let c = ClipRange::new(0.45, 0.95)?;
/// assert_eq!(c.resample_bounds(), (Some(0.45), Some(0.95)));
/// assert_eq!(ClipRange::FULL.resample_bounds(), (None, None));
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipRange {
    lo: f64,
    hi: f64,
}

impl ClipRange {
    /// The unclipped range `(ε, 1)`: the true NELBO, used for every reported likelihood.
    pub const FULL: ClipRange = ClipRange { lo: EPS, hi: 1.0 };

    /// `[lo, hi]` with `ε ≤ lo ≤ hi ≤ 1`. `lo = hi = 1` is BD3-LM's full-masking (AR-equivalent) mode.
    pub fn new(lo: f64, hi: f64) -> Result<Self, Error> {
        if !(lo.is_finite() && hi.is_finite()) || lo < EPS - 1e-12 || hi > 1.0 || lo > hi {
            return Err(invalid(
                "clip range",
                alloc::format!(
                    "[{lo}, {hi}] must satisfy 0.001 <= lo <= hi <= 1 (for example 0.45,0.95; 0.001,1 is unclipped)"
                ),
            ));
        }
        Ok(ClipRange {
            lo: lo.max(EPS),
            hi,
        })
    }

    /// The lower bound β.
    pub fn lo(self) -> f64 {
        self.lo
    }

    /// The upper bound ω.
    pub fn hi(self) -> f64 {
        self.hi
    }

    /// Maps a stratified `u ∈ [0, 1)` into the range: `t = β + (ω − β)·u`.
    pub fn time(self, u: f64) -> f64 {
        self.lo + (self.hi - self.lo) * u
    }

    /// The bounds on the realised masked fraction of a block that rejection
    /// resampling enforces: the lower one unless `β = ε`, the upper one unless `ω = 1`.
    ///
    /// Decision: BD3-LM compares float32 candidates against the Python float
    /// `1e-3`, so its clamped candidates enforce a lower bound by accident
    /// (docs/bd3lm.md §1.6). We enforce what the special case means: no lower bound at `β = ε`.
    pub fn resample_bounds(self) -> (Option<f64>, Option<f64>) {
        let lower = (self.lo > EPS * (1.0 + 1e-9)).then_some(self.lo);
        let upper = (self.hi < 1.0).then_some(self.hi);
        (lower, upper)
    }

    /// Whether the masked count `count` of a block of `block_size` satisfies [`Self::resample_bounds`].
    pub fn accepts_count(self, count: usize, block_size: usize) -> bool {
        let frac = count as f64 / block_size as f64;
        let (lower, upper) = self.resample_bounds();
        lower.is_none_or(|lo| frac >= lo - 1e-12) && upper.is_none_or(|hi| frac <= hi + 1e-12)
    }

    /// Whether some masked count of a block of `block_size` tokens is accepted
    /// (otherwise resampling could never finish).
    pub fn admits_block_size(self, block_size: usize) -> bool {
        (0..=block_size).any(|c| self.accepts_count(c, block_size))
    }
}

impl Default for ClipRange {
    fn default() -> Self {
        ClipRange::FULL
    }
}

/// A masking schedule with the range its times are drawn from: everything the
/// training loss needs to turn a time into a mask probability and a weight.
///
/// ```
/// use did_core::schedule::{ClipRange, MaskSchedule, TrainingSchedule};
/// let s = TrainingSchedule::new(MaskSchedule::Linear, ClipRange::FULL)?;
/// assert_eq!(s.loss_weight(0.5), 2.0);
/// // A lower clip bound above 0.5 turns the weight into plain cross-entropy (docs/bd3lm.md §1.4).
/// let ar = TrainingSchedule::new(MaskSchedule::Linear, ClipRange::new(1.0, 1.0)?)?;
/// assert_eq!(ar.loss_weight(1.0), 1.0);
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrainingSchedule {
    /// The masking schedule.
    pub schedule: MaskSchedule,
    /// The range times are drawn from.
    pub clip: ClipRange,
}

impl TrainingSchedule {
    /// A schedule; clipping is defined for the linear schedule only (where the
    /// clip on `t` and the bound on the masked fraction are the same thing).
    pub fn new(schedule: MaskSchedule, clip: ClipRange) -> Result<Self, Error> {
        if schedule != MaskSchedule::Linear && clip != ClipRange::FULL {
            return Err(invalid(
                "schedule",
                "a clip range needs the linear schedule; drop the clip range or use --schedule linear",
            ));
        }
        Ok(TrainingSchedule { schedule, clip })
    }

    /// The mask probability at `t`.
    pub fn mask_prob(&self, t: f64) -> f64 {
        self.schedule.mask_prob(t)
    }

    /// The weight of a masked token's cross-entropy at `t`: the schedule's NELBO
    /// weight, or the constant 1 when the lower clip bound exceeds 0.5.
    pub fn loss_weight(&self, t: f64) -> f64 {
        if self.clip.lo() > 0.5 {
            1.0
        } else {
            self.schedule.loss_weight(t)
        }
    }
}

/// Stratified (low-discrepancy) times, one per (sequence, block), exactly as
/// BD3-LM's antithetic sampler (docs/bd3lm.md §1.5):
/// `u(k, b) = (U_kb + k·B + b) / (K·B)`, then `t = β + (ω − β)·u`.
///
/// `out` has `batch × blocks` entries, sequence-major. `U_kb` comes from
/// `stream` at `(row = k, index = b)`; use [`crate::rng::Purpose::Time`].
///
/// ```
/// use did_core::rng::{Purpose, RngStream};
/// use did_core::schedule::{stratified_times, ClipRange};
/// let mut t = vec![0.0; 8];
/// stratified_times(&RngStream::new(0, Purpose::Time, 0, 0), 2, 4, ClipRange::FULL, &mut t);
/// assert!(t.iter().all(|&t| (1e-3..=1.0).contains(&t)));
/// ```
pub fn stratified_times(
    stream: &RngStream,
    batch: usize,
    blocks: usize,
    clip: ClipRange,
    out: &mut [f64],
) {
    let n = batch * blocks;
    assert_eq!(
        out.len(),
        n,
        "stratified_times: out must have batch × blocks entries"
    );
    for k in 0..batch {
        for b in 0..blocks {
            let u = stream.uniform(k as u32, b as u32);
            let stratum = (k * blocks + b) as f64;
            let unit = ((u + stratum) / n as f64).min(1.0);
            out[k * blocks + b] = clip.time(unit);
        }
    }
}

/// BD3-LM's grid of clip ranges: widths 0.5, 0.6, 0.7, 0.8, 0.9, lower bounds
/// `0, 0.05, …, 1 − width` clamped to ε (35 ranges), then the unclipped `(ε, 1)`.
///
/// ```
/// let c = did_core::schedule::clip_search_candidates();
/// assert_eq!(c.len(), 36);
/// assert_eq!(*c.last().unwrap(), did_core::schedule::ClipRange::FULL);
/// ```
pub fn clip_search_candidates() -> Vec<ClipRange> {
    let mut out = Vec::with_capacity(36);
    for width_tenths in 5..=9u32 {
        let width = f64::from(width_tenths) / 10.0;
        let steps = (20 - 2 * width_tenths) as usize; // (1 - width) / 0.05
        for i in 0..=steps {
            let lo = (i as f64 * 0.05).max(EPS);
            let hi = (i as f64 * 0.05 + width).min(1.0);
            out.push(ClipRange { lo, hi });
        }
    }
    out.push(ClipRange::FULL);
    out
}

/// The clip-range search: accumulates, per candidate, the variance over
/// (sequence, block) of the weighted per-block loss, summed over batches; the
/// candidate with the least total wins (docs/bd3lm.md §1.6).
///
/// ```
/// use did_core::schedule::{ClipRange, ClipSearch};
/// let mut search = ClipSearch::new(vec![ClipRange::FULL, ClipRange::new(0.45, 0.95)?]);
/// search.add_batch(0, &[1.0, 9.0, 2.0, 7.0]);
/// search.add_batch(1, &[4.0, 5.0, 4.5, 5.5]);
/// assert_eq!(search.best(), Some(ClipRange::new(0.45, 0.95)?));
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClipSearch {
    candidates: Vec<ClipRange>,
    summed_variance: Vec<f64>,
    batches: Vec<u32>,
}

impl ClipSearch {
    /// A search over `candidates` (usually [`clip_search_candidates`]).
    pub fn new(candidates: Vec<ClipRange>) -> Self {
        let n = candidates.len();
        ClipSearch {
            candidates,
            summed_variance: alloc::vec![0.0; n],
            batches: alloc::vec![0; n],
        }
    }

    /// The candidates, in order.
    pub fn candidates(&self) -> &[ClipRange] {
        &self.candidates
    }

    /// Adds one batch evaluated under candidate `index`: `per_block_losses` has one
    /// value per (sequence, block) (see [`per_block_loss`]). The batch adds the
    /// unbiased sample variance of those values, as `torch.var` does.
    pub fn add_batch(&mut self, index: usize, per_block_losses: &[f64]) {
        let n = per_block_losses.len();
        if n < 2 || index >= self.candidates.len() {
            return;
        }
        let mean = per_block_losses.iter().sum::<f64>() / n as f64;
        let ss: f64 = per_block_losses
            .iter()
            .map(|x| (x - mean) * (x - mean))
            .sum();
        self.summed_variance[index] += ss / (n - 1) as f64;
        self.batches[index] += 1;
    }

    /// The summed variance of each candidate so far.
    pub fn summed_variances(&self) -> &[f64] {
        &self.summed_variance
    }

    /// The candidate with the smallest summed variance (the first on ties);
    /// `None` until every candidate has seen a batch.
    pub fn best(&self) -> Option<ClipRange> {
        if self.candidates.is_empty() || self.batches.contains(&0) {
            return None;
        }
        let mut best = 0;
        for (i, v) in self.summed_variance.iter().enumerate() {
            if *v < self.summed_variance[best] {
                best = i;
            }
        }
        Some(self.candidates[best])
    }
}

/// The per-(sequence, block) loss the clip search compares: the sum of the
/// weighted per-token losses of each block divided by the block size.
/// `token_losses` is `[batch, seq_len]` (0 at unmasked tokens).
///
/// ```
/// let l = did_core::schedule::per_block_loss(&[1.0, 3.0, 0.0, 2.0], 4, 2)?;
/// assert_eq!(l, vec![2.0, 1.0]);
/// # Ok::<(), did_core::Error>(())
/// ```
pub fn per_block_loss(
    token_losses: &[f32],
    seq_len: usize,
    block_size: usize,
) -> Result<Vec<f64>, Error> {
    crate::mask::check_block(seq_len, block_size)?;
    if token_losses.len() % seq_len != 0 {
        return Err(invalid("token losses", "must hold batch × seq_len values"));
    }
    Ok(token_losses
        .chunks(block_size)
        .map(|c| c.iter().map(|&x| f64::from(x)).sum::<f64>() / block_size as f64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Purpose;
    use quickcheck::quickcheck;

    #[test]
    fn candidates_match_the_reference_grid() {
        let c = clip_search_candidates();
        assert_eq!(c.len(), 36);
        // 11 + 9 + 7 + 5 + 3 candidates per width.
        assert_eq!(c[0], ClipRange { lo: EPS, hi: 0.5 });
        assert!((c[10].lo - 0.5).abs() < 1e-12 && (c[10].hi - 1.0).abs() < 1e-12);
        assert!(c
            .iter()
            .any(|r| (r.lo - 0.45).abs() < 1e-12 && (r.hi - 0.95).abs() < 1e-12));
        assert!(c
            .iter()
            .any(|r| (r.lo - 0.3).abs() < 1e-12 && (r.hi - 0.8).abs() < 1e-12));
        for r in &c {
            assert!(ClipRange::new(r.lo, r.hi).is_ok(), "{r:?}");
        }
    }

    #[test]
    fn clip_range_rejects_nonsense() {
        assert!(ClipRange::new(0.0, 1.0).is_err());
        assert!(ClipRange::new(0.6, 0.5).is_err());
        assert!(ClipRange::new(0.5, 1.5).is_err());
        assert!(ClipRange::new(f64::NAN, 1.0).is_err());
        assert!(ClipRange::new(1.0, 1.0).is_ok());
    }

    #[test]
    fn cosine_weight_is_the_derivative_ratio() {
        // −α'/(1−α) with 1−α = p(t): check against a central difference of p.
        for &t in &[0.1, 0.4, 0.9] {
            let h = 1e-6;
            let dp = (MaskSchedule::Cosine.mask_prob(t + h)
                - MaskSchedule::Cosine.mask_prob(t - h))
                / (2.0 * h);
            let want = dp / (MaskSchedule::Cosine.mask_prob(t) + EPS);
            assert!((MaskSchedule::Cosine.loss_weight(t) - want).abs() < 1e-6);
        }
    }

    #[test]
    fn clipping_needs_linear() {
        assert!(
            TrainingSchedule::new(MaskSchedule::Cosine, ClipRange::new(0.3, 0.8).unwrap()).is_err()
        );
    }

    #[test]
    fn search_prefers_lower_variance_and_needs_every_candidate() {
        let mut s = ClipSearch::new(clip_search_candidates());
        assert_eq!(s.best(), None);
        for i in 0..36 {
            let spread = if i == 17 { 0.1 } else { 1.0 + i as f64 };
            s.add_batch(i, &[1.0, 1.0 + spread, 1.0 - spread]);
        }
        assert_eq!(s.best(), Some(clip_search_candidates()[17]));
    }

    quickcheck! {
        fn stratified_times_cover_each_stratum_once(seed: u64, batch: u8, blocks: u8) -> bool {
            let (k, b) = (usize::from(batch % 8) + 1, usize::from(blocks % 16) + 1);
            let mut t = alloc::vec![0.0; k * b];
            let full = ClipRange::new(0.0 + EPS, 1.0).unwrap();
            // Map back to u ∈ [0,1) with an identity-like range to check strata.
            stratified_times(&RngStream::new(seed, Purpose::Time, 0, 0), k, b, full, &mut t);
            let n = (k * b) as f64;
            let mut seen = alloc::vec![false; k * b];
            for &ti in &t {
                let u = (ti - EPS) / (1.0 - EPS);
                let s = ((u * n) as usize).min(k * b - 1);
                if seen[s] { return false; }
                seen[s] = true;
            }
            seen.iter().all(|&x| x)
        }

        fn clipped_times_land_in_range(seed: u64, lo: u8, width: u8) -> bool {
            let lo = 0.001 + f64::from(lo % 100) / 200.0;
            let hi = (lo + f64::from(width % 100) / 200.0).min(1.0);
            let clip = ClipRange::new(lo, hi).unwrap();
            let mut t = alloc::vec![0.0; 12];
            stratified_times(&RngStream::new(seed, Purpose::Time, 0, 0), 3, 4, clip, &mut t);
            t.iter().all(|&x| x >= lo && x <= hi)
        }
    }
}
