//! Categorical draws by f64 Gumbel-max, and the confidence of the drawn token.
//!
//! 32-bit Gumbel noise truncates the tails and lowers the effective
//! temperature (docs/bd3lm.md §4.6), so uniforms and logarithms are f64. The draw
//! is Gumbel-max in its exponential-race form, as BD3-LM writes it: token `v`
//! scores `p_v / E_v` with `E_v = −ln u_v` (so `ln` of the score is
//! `ln p_v + g_v`, `g_v = −ln E_v` a Gumbel variate), `u_v` the Philox uniform
//! at `(row, index = v)`; the highest score wins, the smaller id on a tie.
//! Only tokens with `p_v > 0` take part. One logarithm per token.

use alloc::vec::Vec;

use crate::rng::{u64_to_open_unit, RngStream};
use crate::sample::nucleus::Nucleus;
use crate::sample::probs::subs_softmax;

/// Where one sampled token's random numbers come from: what a sampler hands a backend's draw
/// (`DrawOps::draw_tokens` in `crate::backend`) for each position.
///
/// ```
/// use did_core::rng::{Purpose, RngStream};
/// use did_core::sample::DrawSpec;
/// let spec = DrawSpec { stream: RngStream::new(7, Purpose::Categorical, 0, 2), row: 5 };
/// assert_eq!(spec.row, 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawSpec {
    /// The categorical stream of the sequence at its current step.
    pub stream: RngStream,
    /// The row of the stream (the position).
    pub row: u32,
}

/// Gumbel noise `−ln(−ln u)` for `u ∈ (0, 1)`; finite for every output of
/// [`RngStream::uniform`] (|g| < 40).
///
/// ```
/// let g = did_core::sample::categorical::gumbel(0.5);
/// assert!((g - 0.36651292058166435).abs() < 1e-15);
/// ```
#[inline]
pub fn gumbel(u: f64) -> f64 {
    -libm::log(-libm::log(u))
}

/// Draws from `probs` restricted to `candidates` (ids with `p > 0`).
/// Returns `None` when no candidate has positive probability.
///
/// ```
/// use did_core::rng::{Purpose, RngStream};
/// use did_core::sample::categorical::gumbel_argmax;
/// let s = RngStream::new(0, Purpose::Categorical, 0, 0);
/// assert_eq!(gumbel_argmax(&[0.0, 1.0, 0.0], &[0, 1, 2], &s, 0), Some(1));
/// ```
pub fn gumbel_argmax(
    probs: &[f64],
    candidates: &[u32],
    stream: &RngStream,
    row: u32,
) -> Option<u32> {
    let mut best: Option<(f64, u32)> = None;
    for &v in candidates {
        let p = probs[v as usize];
        if p > 0.0 {
            enter_race(&mut best, p, stream.uniform(row, v), v);
        }
    }
    best.map(|(_, v)| v)
}

/// [`gumbel_argmax`] over every id with `probs[v] > 0`, in id order, one Philox block per pair
/// of ids (a block holds the uniforms of ids 2i and 2i + 1): half the generator's work when
/// most of the vocabulary takes part. The same draw as `gumbel_argmax` over those ids.
///
/// ```
/// use did_core::rng::{Purpose, RngStream};
/// use did_core::sample::categorical::{gumbel_argmax, gumbel_argmax_dense};
/// let s = RngStream::new(3, Purpose::Categorical, 0, 0);
/// let p = [0.2, 0.0, 0.5, 0.3];
/// assert_eq!(gumbel_argmax_dense(&p, &s, 7), gumbel_argmax(&p, &[0, 2, 3], &s, 7));
/// ```
pub fn gumbel_argmax_dense(probs: &[f64], stream: &RngStream, row: u32) -> Option<u32> {
    let mut best: Option<(f64, u32)> = None;
    for (pair, ps) in probs.chunks(2).enumerate() {
        if ps.iter().all(|&p| p <= 0.0) {
            continue;
        }
        let block = stream.block(row, pair as u32);
        for (half, &p) in ps.iter().enumerate() {
            if p > 0.0 {
                let bits = (u64::from(block[2 * half + 1]) << 32) | u64::from(block[2 * half]);
                enter_race(
                    &mut best,
                    p,
                    u64_to_open_unit(bits),
                    (2 * pair + half) as u32,
                );
            }
        }
    }
    best.map(|(_, v)| v)
}

/// Token `v` with probability `p` and uniform `u` scores `p / −ln u`; the highest score leads,
/// the smaller id on a tie (so the order of entry does not matter).
#[inline]
fn enter_race(best: &mut Option<(f64, u32)>, p: f64, u: f64, v: u32) {
    let score = p / -libm::log(u);
    match *best {
        Some((s, id)) if s > score || (s == score && id < v) => {}
        _ => *best = Some((score, v)),
    }
}

/// Which probability stands for "how sure the model was" about a drawn token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum ConfidenceKind {
    /// The drawn token's probability under the nucleus-renormalised distribution
    /// it was drawn from (the default: what the paper's description fits best).
    #[default]
    Nucleus,
    /// The drawn token's probability before nucleus filtering.
    Raw,
    /// The largest probability before nucleus filtering, whatever was drawn.
    Max,
}

/// The three confidences of one drawn token, recorded when it was drawn.
///
/// ```
/// use did_core::sample::{Confidence, ConfidenceKind};
/// let c = Confidence { nucleus: 0.5, raw: 0.4, max: 0.45 };
/// assert_eq!(c.get(ConfidenceKind::default()), 0.5);
/// assert!(Confidence::PINNED.get(ConfidenceKind::Max).is_infinite());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confidence {
    /// See [`ConfidenceKind::Nucleus`].
    pub nucleus: f64,
    /// See [`ConfidenceKind::Raw`].
    pub raw: f64,
    /// See [`ConfidenceKind::Max`].
    pub max: f64,
}

impl Confidence {
    /// The confidence of a token that was given, not drawn (prompt, BOS): never remasked.
    pub const PINNED: Confidence = Confidence {
        nucleus: f64::INFINITY,
        raw: f64::INFINITY,
        max: f64::INFINITY,
    };

    /// The value of one kind.
    pub fn get(&self, kind: ConfidenceKind) -> f64 {
        match kind {
            ConfidenceKind::Nucleus => self.nucleus,
            ConfidenceKind::Raw => self.raw,
            ConfidenceKind::Max => self.max,
        }
    }
}

/// A drawn token and its confidences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledToken {
    /// The token id.
    pub id: u32,
    /// Its confidences at the moment it was drawn.
    pub confidence: Confidence,
}

/// Reusable buffers for [`draw_token`], so a sampling loop does not allocate.
#[derive(Debug, Default, Clone)]
pub struct DrawScratch {
    probs: Vec<f64>,
    order: Vec<u32>,
}

/// Draws one token from a row of raw logits: SUBS softmax (no `[MASK]`),
/// nucleus filtering, f64 Gumbel-max from `stream` at `row`; records the
/// three confidences.
///
/// ```
/// use did_core::rng::{Purpose, RngStream};
/// use did_core::sample::{categorical::DrawScratch, draw_token, Nucleus};
/// let logits = [2.0f32, 1.0, 0.5, 9.0]; // id 3 is [MASK]
/// let s = RngStream::new(1, Purpose::Categorical, 0, 0);
/// let t = draw_token(&logits, 3, &Nucleus::default(), &s, 0, &mut DrawScratch::default());
/// assert_ne!(t.id, 3);
/// assert!(t.confidence.nucleus >= t.confidence.raw);
/// ```
pub fn draw_token(
    logits: &[f32],
    mask_id: u32,
    nucleus: &Nucleus,
    stream: &RngStream,
    row: u32,
    scratch: &mut DrawScratch,
) -> SampledToken {
    draw_into(logits, mask_id, nucleus, stream, row, scratch).0
}

/// [`draw_token`], and the entropy (nats) of the nucleus-renormalised distribution the token
/// was drawn from: the error proxy of the entropy-bounded update ([`crate::sample::parallel`]).
///
/// ```
/// use did_core::rng::{Purpose, RngStream};
/// use did_core::sample::categorical::{draw_token, draw_token_and_entropy, DrawScratch};
/// use did_core::sample::{Nucleus, NucleusRule};
/// let logits = [0.0f32, 0.0, 0.0, 0.0, 9.0]; // four equally likely ids; id 4 is [MASK]
/// let s = RngStream::new(1, Purpose::Categorical, 0, 0);
/// let all = Nucleus::new(1.0, NucleusRule::Bd3)?;
/// let (t, h) = draw_token_and_entropy(&logits, 4, &all, &s, 0, &mut DrawScratch::default());
/// assert!((h - 4f64.ln()).abs() < 1e-12);
/// assert_eq!(t, draw_token(&logits, 4, &all, &s, 0, &mut DrawScratch::default()));
/// # Ok::<(), did_core::Error>(())
/// ```
pub fn draw_token_and_entropy(
    logits: &[f32],
    mask_id: u32,
    nucleus: &Nucleus,
    stream: &RngStream,
    row: u32,
    scratch: &mut DrawScratch,
) -> (SampledToken, f64) {
    let (token, kept) = draw_into(logits, mask_id, nucleus, stream, row, scratch);
    let mut entropy = 0.0;
    for &v in &scratch.order[..kept] {
        let p = scratch.probs[v as usize];
        if p > 0.0 {
            entropy -= p * libm::log(p);
        }
    }
    (token, entropy.max(0.0))
}

/// The draw of [`draw_token`]; leaves the nucleus distribution in `scratch.probs` and its
/// ids in `scratch.order[..kept]`, and returns `kept` with the token.
fn draw_into(
    logits: &[f32],
    mask_id: u32,
    nucleus: &Nucleus,
    stream: &RngStream,
    row: u32,
    scratch: &mut DrawScratch,
) -> (SampledToken, usize) {
    let probs = &mut scratch.probs;
    probs.clear();
    probs.resize(logits.len(), 0.0);
    subs_softmax(logits, mask_id, probs);
    let mut raw_max = 0.0f64;
    for &p in probs.iter() {
        raw_max = raw_max.max(p);
    }
    // Pre-nucleus probabilities are needed for the raw confidence: keep the
    // drawn token's one by recomputing from the kept mass after filtering.
    let kept = nucleus.apply(probs, &mut scratch.order);
    let candidates = &scratch.order[..kept];
    // The nucleus renormalises by the kept mass m: p_nucleus = p_raw / m, so
    // p_raw = p_nucleus · m, and m = p_raw(top) / p_nucleus(top).
    let top = candidates[0] as usize;
    let kept_mass = raw_max / probs[top];
    // A wide nucleus is raced in id order, where pairs of ids share a Philox block.
    let raced = if 4 * kept > probs.len() {
        gumbel_argmax_dense(probs, stream, row)
    } else {
        gumbel_argmax(probs, candidates, stream, row)
    };
    let id = raced.unwrap_or(candidates[0]);
    let nucleus_p = probs[id as usize];
    let token = SampledToken {
        id,
        confidence: Confidence {
            nucleus: nucleus_p,
            raw: nucleus_p * kept_mass,
            max: raw_max,
        },
    };
    (token, kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{u64_to_open_unit, Purpose};
    use crate::sample::NucleusRule;
    use quickcheck::quickcheck;

    quickcheck! {
        fn gumbel_is_finite_for_every_open_uniform(bits: u64) -> bool {
            gumbel(u64_to_open_unit(bits)).is_finite()
        }
        fn the_dense_race_is_the_sparse_one(probs: Vec<u8>, seed: u64, row: u32) -> bool {
            // Probabilities with zeros among them (ids that take no part).
            let p: Vec<f64> = probs.iter().map(|&x| if x % 3 == 0 { 0.0 } else { f64::from(x) }).collect();
            let ids: Vec<u32> = (0..p.len() as u32).filter(|&v| p[v as usize] > 0.0).collect();
            let s = RngStream::new(seed, Purpose::Categorical, 1, 2);
            gumbel_argmax_dense(&p, &s, row) == gumbel_argmax(&p, &ids, &s, row)
        }
        fn draws_come_from_the_nucleus_and_confidences_agree(logits: Vec<f32>, seed: u64) -> bool {
            let logits: Vec<f32> = logits.into_iter().map(|x| if x.is_finite() { x % 10.0 } else { 0.0 }).collect();
            if logits.len() < 2 { return true; }
            let mask = (logits.len() - 1) as u32;
            let nucleus = Nucleus::new(0.9, NucleusRule::Bd3).unwrap();
            let t = draw_token(&logits, mask, &nucleus, &RngStream::new(seed, Purpose::Categorical, 0, 0), 0, &mut DrawScratch::default());
            let mut p = vec![0.0; logits.len()];
            subs_softmax(&logits, mask, &mut p);
            let raw = p[t.id as usize];
            let max = p.iter().cloned().fold(0.0, f64::max);
            let mut filtered = p.clone();
            nucleus.apply(&mut filtered, &mut Vec::new());
            t.id != mask && filtered[t.id as usize] > 0.0
                && (t.confidence.raw - raw).abs() < 1e-9
                && (t.confidence.max - max).abs() < 1e-12
                && (t.confidence.nucleus - filtered[t.id as usize]).abs() < 1e-12
        }
    }

    #[test]
    fn extreme_uniforms_are_finite() {
        assert!(gumbel(u64_to_open_unit(0)).is_finite());
        assert!(gumbel(u64_to_open_unit(u64::MAX)).is_finite());
    }

    #[test]
    fn frequencies_match_probabilities() {
        // χ²-style check: 20k draws from [0.5, 0.3, 0.2] without a nucleus.
        let p = [0.5, 0.3, 0.2];
        let mut counts = [0u32; 3];
        let s = RngStream::new(9, Purpose::Categorical, 0, 0);
        for row in 0..20_000 {
            counts[gumbel_argmax(&p, &[0, 1, 2], &s, row).unwrap() as usize] += 1;
        }
        for i in 0..3 {
            let f = f64::from(counts[i]) / 20_000.0;
            assert!((f - p[i]).abs() < 0.015, "{counts:?}");
        }
    }
}
