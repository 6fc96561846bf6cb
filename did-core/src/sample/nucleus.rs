//! Nucleus (top-p) filtering.
//!
//! Tokens are ranked by probability, descending, ties by the smaller id (a
//! total order, so the result never depends on a sort's stability).
//! BD3-LM's rule ([`NucleusRule::Bd3`], the default) keeps the tokens whose
//! cumulative mass *counting themselves* is ≤ p, and always the top one: the
//! token that crosses p is dropped (bd3lm.md §4.6). The common rule
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
    /// Cost: expected linear in the vocabulary, whatever the nucleus size — a
    /// quickselect on rank that recurses into the half holding the p boundary
    /// (cumulative mass is monotone in rank), sorting only the last ≤ 32.
    pub fn apply(&self, probs: &mut [f64], order: &mut Vec<u32>) -> usize {
        order.clear();
        order.extend((0..probs.len() as u32).filter(|&v| probs[v as usize] > 0.0));
        let n = order.len();
        if n == 0 {
            return 0;
        }
        let rank = |a: &u32, b: &u32| -> Ordering {
            let (pa, pb) = (probs[*a as usize], probs[*b as usize]);
            pb.partial_cmp(&pa)
                .unwrap_or(Ordering::Equal)
                .then(a.cmp(b))
        };
        // Invariant: order[..lo] all rank before order[lo..hi], which rank
        // before order[hi..]; `before` is the mass of order[..lo]; the number
        // kept lies in [lo, hi] (or is `n` for p ≥ 1).
        let (mut lo, mut hi, mut before) = (0usize, n, 0.0f64);
        let kept = if self.p >= 1.0 {
            n
        } else {
            loop {
                if hi - lo <= 32 {
                    order[lo..hi].sort_unstable_by(rank);
                    let mut cum = before;
                    let mut kept = hi;
                    for (i, &v) in order[lo..hi].iter().enumerate() {
                        cum += probs[v as usize];
                        let crossed = match self.rule {
                            NucleusRule::Bd3 => cum > self.p,
                            NucleusRule::SmallestCover => cum >= self.p,
                        };
                        if crossed {
                            kept = match self.rule {
                                NucleusRule::Bd3 => lo + i,
                                NucleusRule::SmallestCover => lo + i + 1,
                            };
                            break;
                        }
                    }
                    break kept.max(1);
                }
                let mid = (hi - lo) / 2;
                order[lo..hi].select_nth_unstable_by(mid, rank);
                let through_pivot: f64 = before
                    + order[lo..=lo + mid]
                        .iter()
                        .map(|&v| probs[v as usize])
                        .sum::<f64>();
                let pivot_kept = match self.rule {
                    NucleusRule::Bd3 => through_pivot <= self.p,
                    NucleusRule::SmallestCover => through_pivot < self.p,
                };
                if pivot_kept {
                    before = through_pivot;
                    lo += mid + 1;
                } else {
                    hi = lo + mid + usize::from(self.rule == NucleusRule::SmallestCover);
                }
            }
        };
        // The top token first (callers read the maximum there).
        if let Some(top) = (0..kept).min_by(|&i, &j| rank(&order[i], &order[j])) {
            order.swap(0, top);
        }
        let mass: f64 = order[..kept].iter().map(|&v| probs[v as usize]).sum();
        for &v in &order[kept..] {
            probs[v as usize] = 0.0;
        }
        for &v in &order[..kept] {
            probs[v as usize] /= mass;
        }
        kept
    }
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
