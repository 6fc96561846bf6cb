//! Parallel decoding: which of a block's freshly drawn positions to keep in one call.
//!
//! The parallel updates ([`BlockUpdate::ConfidenceThreshold`], [`BlockUpdate::EntropyBound`],
//! [`BlockUpdate::TopK`]) draw a token at *every* masked position of the active block in one
//! denoiser call, then keep some of the draws and leave the rest masked for the next call
//! (where they are drawn afresh). Which ones are kept is decided here, per sequence, from the
//! draws alone, so a sequence keeps the same positions whatever batch it is in. Every rule
//! keeps at least one position, so a block always finishes. The rules and where they come
//! from are described in `docs/sampling.md`.
//!
//! [`BlockUpdate::ConfidenceThreshold`]: crate::sample::BlockUpdate::ConfidenceThreshold
//! [`BlockUpdate::EntropyBound`]: crate::sample::BlockUpdate::EntropyBound
//! [`BlockUpdate::TopK`]: crate::sample::BlockUpdate::TopK

use alloc::vec::Vec;
use core::cmp::Ordering;

/// One fresh draw at a masked position: where, how sure, and how spread out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The position in the sequence.
    pub pos: usize,
    /// The drawn token's confidence (the kind the sampler was told to use).
    pub confidence: f64,
    /// The entropy (nats) of the distribution it was drawn from; 0 where not computed.
    pub entropy: f64,
}

/// Highest confidence first, the smaller position on a tie.
fn most_confident_first(a: &Candidate, b: &Candidate) -> Ordering {
    b.confidence
        .total_cmp(&a.confidence)
        .then(a.pos.cmp(&b.pos))
}

/// Keeps every candidate whose confidence exceeds `tau`, or the single most confident one
/// where none does (Fast-dLLM's rule). Returns indices into `candidates`, ascending.
///
/// ```
/// use did_core::sample::parallel::{keep_above_threshold, Candidate};
/// let c = |pos, confidence| Candidate { pos, confidence, entropy: 0.0 };
/// assert_eq!(keep_above_threshold(&[c(4, 0.95), c(5, 0.3), c(6, 0.99)], 0.9), vec![0, 2]);
/// assert_eq!(keep_above_threshold(&[c(4, 0.5), c(5, 0.6)], 0.9), vec![1]);
/// ```
pub fn keep_above_threshold(candidates: &[Candidate], tau: f64) -> Vec<usize> {
    let above: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].confidence > tau)
        .collect();
    if above.is_empty() {
        keep_most_confident(candidates, 1)
    } else {
        above
    }
}

/// Keeps the `k` most confident candidates (all of them when there are fewer), ties to the
/// smaller position. Returns indices into `candidates`, ascending.
///
/// ```
/// use did_core::sample::parallel::{keep_most_confident, Candidate};
/// let c = |pos, confidence| Candidate { pos, confidence, entropy: 0.0 };
/// assert_eq!(keep_most_confident(&[c(1, 0.2), c(2, 0.7), c(3, 0.7)], 2), vec![1, 2]);
/// ```
pub fn keep_most_confident(candidates: &[Candidate], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_unstable_by(|&a, &b| most_confident_first(&candidates[a], &candidates[b]));
    order.truncate(k.max(1));
    order.sort_unstable();
    order
}

/// Keeps the longest run of candidates, taken in order of increasing entropy (ties to the
/// smaller position), whose summed entropy less its largest stays within `budget` (nats): the
/// EB-sampler's rule. The first candidate is always kept; with `budget = 0` exactly the
/// zero-entropy ones are, or the single lowest. Returns indices into `candidates`, ascending.
///
/// ```
/// use did_core::sample::parallel::{keep_within_entropy_budget, Candidate};
/// let c = |pos, entropy| Candidate { pos, confidence: 0.0, entropy };
/// let cands = [c(0, 0.5), c(1, 0.1), c(2, 2.0), c(3, 0.3)];
/// // 0.1, then 0.3 (0.1 ≤ 1), then 0.5 (0.4 ≤ 1), then 2.0 (0.9 ≤ 1): all four.
/// assert_eq!(keep_within_entropy_budget(&cands, 1.0), vec![0, 1, 2, 3]);
/// // With 0.4: 0.1, 0.3, then 0.5 (0.4 ≤ 0.4); the 2.0 would make it 0.9.
/// assert_eq!(keep_within_entropy_budget(&cands, 0.4), vec![0, 1, 3]);
/// // With 0.3: 0.1, then 0.3 (0.1 ≤ 0.3); the 0.5 would make it 0.4.
/// assert_eq!(keep_within_entropy_budget(&cands, 0.3), vec![1, 3]);
/// ```
pub fn keep_within_entropy_budget(candidates: &[Candidate], budget: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_unstable_by(|&a, &b| {
        let (a, b) = (&candidates[a], &candidates[b]);
        a.entropy.total_cmp(&b.entropy).then(a.pos.cmp(&b.pos))
    });
    // Sorted ascending, the largest entropy of a prefix is its last one, so a prefix of m
    // fits when the first m − 1 sum to at most the budget.
    let mut before_last = 0.0;
    let mut keep = 0;
    for &i in &order {
        if keep > 0 && before_last > budget {
            break;
        }
        before_last += candidates[i].entropy;
        keep += 1;
    }
    order.truncate(keep);
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, TestResult};

    fn candidates(values: &[(u8, u8)]) -> Vec<Candidate> {
        values
            .iter()
            .enumerate()
            .map(|(i, &(c, h))| Candidate {
                pos: 3 * i + 1,
                confidence: f64::from(c) / 255.0,
                entropy: f64::from(h) / 32.0,
            })
            .collect()
    }

    quickcheck! {
        fn threshold_keeps_exactly_those_above_or_the_best(values: Vec<(u8, u8)>, tau: u8) -> TestResult {
            if values.is_empty() { return TestResult::discard(); }
            let c = candidates(&values);
            let tau = f64::from(tau) / 255.0;
            let kept = keep_above_threshold(&c, tau);
            let above: Vec<usize> = (0..c.len()).filter(|&i| c[i].confidence > tau).collect();
            if above.is_empty() {
                let best = c.iter().map(|x| x.confidence).fold(f64::MIN, f64::max);
                TestResult::from_bool(kept.len() == 1 && c[kept[0]].confidence == best
                    && c.iter().take(kept[0]).all(|x| x.confidence < best))
            } else {
                TestResult::from_bool(kept == above)
            }
        }

        fn top_k_keeps_k_and_none_better_is_left(values: Vec<(u8, u8)>, k: u8) -> TestResult {
            if values.is_empty() { return TestResult::discard(); }
            let c = candidates(&values);
            let k = usize::from(k % 8) + 1;
            let kept = keep_most_confident(&c, k);
            let left_best = (0..c.len()).filter(|i| !kept.contains(i)).map(|i| c[i].confidence).fold(f64::MIN, f64::max);
            TestResult::from_bool(kept.len() == k.min(c.len())
                && kept.windows(2).all(|w| w[0] < w[1])
                && kept.iter().all(|&i| c[i].confidence >= left_best))
        }

        fn entropy_budget_holds_and_is_tight(values: Vec<(u8, u8)>, budget: u8) -> TestResult {
            if values.is_empty() { return TestResult::discard(); }
            let c = candidates(&values);
            let budget = f64::from(budget) / 16.0;
            let kept = keep_within_entropy_budget(&c, budget);
            if kept.is_empty() { return TestResult::failed(); }
            let sum: f64 = kept.iter().map(|&i| c[i].entropy).sum();
            let max = kept.iter().map(|&i| c[i].entropy).fold(0.0, f64::max);
            let left_min = (0..c.len()).filter(|i| !kept.contains(i)).map(|i| c[i].entropy).fold(f64::INFINITY, f64::min);
            // Within budget (or a single one), nothing lower left out, and one more would break it.
            let within = kept.len() == 1 || sum - max <= budget + 1e-12;
            let lowest = kept.iter().all(|&i| c[i].entropy <= left_min);
            let tight = kept.len() == c.len() || sum > budget - 1e-12;
            TestResult::from_bool(within && lowest && tight)
        }
    }
}
