//! Nucleus (top-p) filtering.
//!
//! Tokens are ranked by probability, descending, ties by the smaller id (a
//! total order, so the result never depends on a sort's stability).
//! BD3-LM's rule ([`NucleusRule::Bd3`], the default) keeps the tokens whose
//! cumulative mass *counting themselves* is ≤ p, and always the top one: the
//! token that crosses p is dropped (docs/bd3lm.md §4.6). The common rule
//! ([`NucleusRule::SmallestCover`]) keeps the smallest prefix whose mass is ≥ p.
//! `p ≥ 1` keeps every token with non-zero probability, whatever the rounding
//! of the cumulative sum.

use alloc::vec::Vec;
use core::cmp::Ordering;

use crate::{error::invalid, Error};

/// Which token at the boundary of the nucleus is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NucleusRule {
    /// Keep tokens with cumulative mass ≤ p (always the top one). BD3-LM's sampler.
    #[default]
    Bd3,
    /// Keep the smallest prefix whose mass reaches p (Holtzman et al.).
    SmallestCover,
}

/// Top-p filtering with a rule.
///
/// ```
/// use did_core::sample::{Nucleus, NucleusRule};
/// let mut p = vec![0.5, 0.3, 0.2];
/// let mut order = Vec::new();
/// let kept = Nucleus::new(0.9, NucleusRule::Bd3)?.apply(&mut p, &mut order);
/// assert_eq!(kept, 2); // 0.5 + 0.3 = 0.8 ≤ 0.9; adding 0.2 would cross
/// assert!((p[0] - 0.625).abs() < 1e-12 && p[2] == 0.0);
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nucleus {
    p: f64,
    rule: NucleusRule,
}

impl Default for Nucleus {
    /// p = 0.9 with BD3-LM's rule, the setting of every reported BD3-LM number.
    fn default() -> Self {
        Nucleus {
            p: 0.9,
            rule: NucleusRule::Bd3,
        }
    }
}

impl Nucleus {
    /// Top-p with `p ∈ (0, 1]`.
    pub fn new(p: f64, rule: NucleusRule) -> Result<Self, Error> {
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid(
                "nucleus p",
                alloc::format!("{p} must be in (0, 1]; 0.9 is BD3-LM's, 1 disables it"),
            ));
        }
        Ok(Nucleus { p, rule })
    }

    /// The mass p.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// The boundary rule.
    pub fn rule(&self) -> NucleusRule {
        self.rule
    }

    /// Filters `probs` in place (a distribution; zeros allowed) and renormalises it.
    /// Returns how many tokens were kept; `order[..kept]` lists them, the most
    /// probable first and the rest in no particular order.
    ///
    /// Cost: about one pass over the vocabulary, whatever the nucleus size. The
    /// ranking is never sorted: a radix select on the bits of the probabilities
    /// (monotone for positive floats) buckets the candidates by 12 bits at a
    /// time, keeps whole buckets above the one holding the p boundary, and
    /// recurses into that bucket only; the last few (or exact ties) are ordered
    /// by (probability, id). Masses are summed bucket by bucket in f64.
    pub fn apply(&self, probs: &mut [f64], order: &mut Vec<u32>) -> usize {
        order.clear();
        order.extend((0..probs.len() as u32).filter(|&v| probs[v as usize] > 0.0));
        let n = order.len();
        if n == 0 {
            return 0;
        }
        let kept = if self.p >= 1.0 {
            n
        } else {
            self.select(probs, order)
        }
        .max(1);
        // The top token first (callers read the maximum there).
        let rank = |a: u32, b: u32| ranks_before(probs, a, b);
        let mut top = 0;
        for i in 1..kept {
            if rank(order[i], order[top]) {
                top = i;
            }
        }
        order.swap(0, top);
        let mass: f64 = order[..kept].iter().map(|&v| probs[v as usize]).sum();
        for &v in &order[kept..] {
            probs[v as usize] = 0.0;
        }
        for &v in &order[..kept] {
            probs[v as usize] /= mass;
        }
        kept
    }

    /// Whether the cumulative mass `cum` (counting the newest token) has passed the boundary.
    fn crossed(&self, cum: f64) -> bool {
        match self.rule {
            NucleusRule::Bd3 => cum > self.p,
            NucleusRule::SmallestCover => cum >= self.p,
        }
    }

    /// How many tokens the nucleus keeps; moves them to the front of `order`.
    fn select(&self, probs: &[f64], order: &mut [u32]) -> usize {
        const DIGIT_BITS: u32 = 12;
        let mut mass = [0.0f64; 1 << DIGIT_BITS];
        let mut count = [0u32; 1 << DIGIT_BITS];
        let (mut lo, mut hi, mut before) = (0usize, order.len(), 0.0f64);
        let mut shift: i32 = 52;
        loop {
            let span = &mut order[lo..hi];
            let first = probs[span[0] as usize];
            let all_tied = span.iter().all(|&v| probs[v as usize] == first);
            if span.len() <= 64 || shift < 0 || all_tied {
                // Rank the rest exactly: by probability, then id (ties need no
                // comparison of probabilities, only of ids).
                if all_tied {
                    span.sort_unstable();
                } else {
                    span.sort_unstable_by(|&a, &b| {
                        if ranks_before(probs, a, b) {
                            Ordering::Less
                        } else {
                            Ordering::Greater
                        }
                    });
                }
                let mut cum = before;
                for (i, &v) in span.iter().enumerate() {
                    cum += probs[v as usize];
                    if self.crossed(cum) {
                        return lo + i + usize::from(self.rule == NucleusRule::SmallestCover);
                    }
                }
                return hi;
            }
            let digit = |v: u32| {
                ((probs[v as usize].to_bits() >> shift) & ((1 << DIGIT_BITS) - 1)) as usize
            };
            mass.iter_mut().for_each(|m| *m = 0.0);
            count.iter_mut().for_each(|c| *c = 0);
            for &v in span.iter() {
                let d = digit(v);
                mass[d] += probs[v as usize];
                count[d] += 1;
            }
            // Walk the buckets from the most probable down to the one holding the boundary.
            let mut cum = before;
            let mut boundary = None;
            for d in (0..1 << DIGIT_BITS).rev() {
                if count[d] == 0 {
                    continue;
                }
                if self.crossed(cum + mass[d]) {
                    boundary = Some(d);
                    break;
                }
                cum += mass[d];
            }
            let Some(boundary) = boundary else { return hi };
            // Three-way partition: buckets above the boundary, the boundary bucket, the rest.
            let (mut above, mut i, mut below) = (0usize, 0usize, span.len());
            while i < below {
                let d = digit(span[i]);
                if d > boundary {
                    span.swap(i, above);
                    above += 1;
                    i += 1;
                } else if d < boundary {
                    below -= 1;
                    span.swap(i, below);
                } else {
                    i += 1;
                }
            }
            before = cum;
            hi = lo + below;
            lo += above;
            shift -= DIGIT_BITS as i32;
        }
    }
}

/// Whether token `a` ranks before token `b`: more probable, or as probable with a smaller id.
fn ranks_before(probs: &[f64], a: u32, b: u32) -> bool {
    let (pa, pb) = (probs[a as usize], probs[b as usize]);
    pa > pb || (pa == pb && a < b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::probs::subs_softmax;
    use quickcheck::{quickcheck, TestResult};

    fn distribution(logits: &[f32]) -> Vec<f64> {
        let mut p = alloc::vec![0.0; logits.len()];
        subs_softmax(logits, u32::MAX, &mut p);
        p
    }

    fn ranked(p: &[f64]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..p.len()).collect();
        idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
        idx
    }

    fn check(logits: Vec<f32>, p: f64, rule: NucleusRule) -> TestResult {
        let logits: Vec<f32> = logits
            .into_iter()
            .map(|x| if x.is_finite() { x % 20.0 } else { 0.0 })
            .collect();
        if logits.is_empty() {
            return TestResult::discard();
        }
        let before = distribution(&logits);
        let mut after = before.clone();
        let mut order = Vec::new();
        let kept = Nucleus::new(p, rule).unwrap().apply(&mut after, &mut order);
        let rank = ranked(&before);
        // The kept set is a prefix of the ranking, the top one first.
        let mut set: Vec<usize> = order[..kept].iter().map(|&v| v as usize).collect();
        let first = set[0];
        set.sort_by(|&a, &b| before[b].partial_cmp(&before[a]).unwrap().then(a.cmp(&b)));
        if set != rank[..kept] || first != rank[0] {
            return TestResult::error("kept set is not the top of the ranking");
        }
        let mass: f64 = rank[..kept].iter().map(|&v| before[v]).sum();
        let next = rank.get(kept).map(|&v| before[v]).filter(|&x| x > 0.0);
        let ok = match rule {
            // At least mass p, and minimal.
            NucleusRule::SmallestCover => {
                (mass >= p - 1e-12 || next.is_none())
                    && (mass - before[rank[kept - 1]] < p || kept == 1)
            }
            // At most mass p (or the top one alone), and maximal.
            NucleusRule::Bd3 => {
                (mass <= p + 1e-12 || kept == 1) && next.is_none_or(|x| mass + x > p - 1e-12)
            }
        };
        let sums_to_one = (after.iter().sum::<f64>() - 1.0).abs() < 1e-9;
        TestResult::from_bool(ok && sums_to_one)
    }

    quickcheck! {
        fn smallest_cover_keeps_at_least_p_and_is_minimal(logits: Vec<f32>, p: u8) -> TestResult {
            check(logits, (f64::from(p) + 1.0) / 257.0, NucleusRule::SmallestCover)
        }
        fn bd3_rule_keeps_at_most_p_and_is_maximal(logits: Vec<f32>, p: u8) -> TestResult {
            check(logits, (f64::from(p) + 1.0) / 257.0, NucleusRule::Bd3)
        }
        fn large_nuclei_recurse_past_the_sorted_base_case(seed: u32) -> TestResult {
            // A flat-ish distribution over 1000 tokens: the nucleus holds hundreds.
            let logits: Vec<f32> = (0..1000u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0).collect();
            check(logits, 0.9, NucleusRule::Bd3)
        }
    }

    #[test]
    fn p_one_keeps_everything_non_zero() {
        let mut p = vec![0.25, 0.25, 0.0, 0.5];
        let kept = Nucleus::new(1.0, NucleusRule::Bd3)
            .unwrap()
            .apply(&mut p, &mut Vec::new());
        assert_eq!(kept, 3);
    }

    #[test]
    fn top_token_alone_above_p_is_kept() {
        let mut p = vec![0.05, 0.95];
        let mut order = Vec::new();
        assert_eq!(
            Nucleus::new(0.9, NucleusRule::Bd3)
                .unwrap()
                .apply(&mut p, &mut order),
            1
        );
        assert_eq!(order[0], 1);
        assert_eq!(p, vec![0.0, 1.0]);
    }

    #[test]
    fn bad_p_is_rejected() {
        for p in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(Nucleus::new(p, NucleusRule::Bd3).is_err());
        }
    }
}
