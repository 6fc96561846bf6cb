//! Remasking: which drafted tokens turn back into `[MASK]` before a refine stage.
//!
//! Every strategy gives each eligible position a score and remasks the lowest
//! scores; they differ only in where the score comes from:
//!
//! - [`RemaskStrategy::Snapshot`] — the confidence snapshotted when the token
//!   was drawn (the method of the paper);
//! - [`RemaskStrategy::PostHoc`] — the probability the model gives the token
//!   when it re-reads the finished sequence (a baseline: the model tends to
//!   reaffirm what it wrote);
//! - [`RemaskStrategy::Random`] — a uniform random key (a baseline).
//!
//! How many are remasked is a [`RemaskAmount`]: a fixed fraction γ (the
//! paper's), or every score below a threshold between a minimum and a maximum
//! fraction (adaptive: a confident draft loses little, a poor one is not
//! regenerated wholesale), decided per sequence and per scope unit.
//!
//! **The count is exact**: `floor(γ · n)` positions out of the `n` eligible
//! ones of a scope (with a 1e-9 tolerance, so that 0.29 × 100 is 29, not 28).
//! Eligible means drawn: never the BOS, a prompt token, or padding after the
//! end of a sequence. **Ties** go to the smaller position.

use alloc::string::ToString;
use alloc::vec::Vec;
use core::cmp::Ordering;
use core::fmt;
use core::str::FromStr;

use crate::error::{invalid, parse_error};
use crate::sample::ConfidenceKind;
use crate::Error;

/// Where the scores that rank tokens for remasking come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemaskStrategy {
    /// The confidence recorded when each token was drawn.
    Snapshot(ConfidenceKind),
    /// The probability of each token when the model re-scores the finished
    /// sequence: one pass with the next stage's attention block size, reading
    /// the raw outputs at the visible tokens (no carry-over; `[MASK]` excluded).
    PostHoc,
    /// Uniformly random.
    Random,
}

impl Default for RemaskStrategy {
    fn default() -> Self {
        RemaskStrategy::Snapshot(ConfidenceKind::Nucleus)
    }
}

/// Over which positions the lowest `γ` fraction is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum RemaskScope {
    /// Over the whole sequence (the default).
    #[default]
    Global,
    /// Within each block of the *previous* stage (each draft block loses its
    /// own least confident `floor(γ · n)`). Per block of the next stage would
    /// equal `Global` for the usual global refine, so it is not offered.
    PerBlock,
}

/// How many of a scope unit's eligible tokens are remasked (always the lowest-scoring ones).
///
/// ```
/// use did_core::refine::RemaskAmount;
/// let adaptive: RemaskAmount = "below:0.5:0.1..0.4".parse()?;
/// assert_eq!(adaptive, RemaskAmount::Below { score: 0.5, min: 0.1, max: 0.4 });
/// // 10 eligible: 3 score below 0.5, inside [floor(0.1·10), floor(0.4·10)] = [1, 4].
/// let scores = [0.1, 0.9, 0.3, 0.8, 0.95, 0.99, 0.7, 0.2, 0.6, 0.9];
/// assert_eq!(adaptive.count(&scores), 3);
/// assert_eq!(RemaskAmount::Fraction(0.25).count(&scores), 2);
/// assert_eq!(adaptive.to_string(), "below:0.5:0.1..0.4");
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RemaskAmount {
    /// `floor(γ · n)`: the paper's fixed ratio γ ∈ (0, 1]. Written as the number alone.
    Fraction(f64),
    /// Every token scoring below `score`, but at least `floor(min · n)` and at most
    /// `floor(max · n)`. Written `below:c` (min 0, max 1) or `below:c:min..max`.
    Below {
        /// The score (confidence) under which a token is remasked.
        score: f64,
        /// The smallest fraction remasked.
        min: f64,
        /// The largest fraction remasked.
        max: f64,
    },
}

impl RemaskAmount {
    /// How many of the `n = scores.len()` eligible tokens with these scores are remasked
    /// (examples on the type).
    pub fn count(&self, scores: &[f64]) -> usize {
        let n = scores.len();
        match *self {
            RemaskAmount::Fraction(ratio) => remask_count(ratio, n),
            RemaskAmount::Below { score, min, max } => {
                let below = scores.iter().filter(|&&s| s < score).count();
                below.clamp(
                    remask_count(min, n),
                    remask_count(max, n).max(remask_count(min, n)),
                )
            }
        }
    }

    /// Checks the numbers; the error names the fix.
    ///
    /// ```
    /// use did_core::refine::RemaskAmount;
    /// assert!(RemaskAmount::Fraction(0.25).validate().is_ok());
    /// let e = RemaskAmount::Below { score: 0.5, min: 0.6, max: 0.2 }.validate().unwrap_err();
    /// assert!(e.to_string().contains("min ≤ max"));
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        match *self {
            RemaskAmount::Fraction(r) if !(r > 0.0 && r <= 1.0) => Err(invalid(
                "remask ratio",
                alloc::format!("{r} must be in (0, 1], e.g. L:0.25"),
            )),
            RemaskAmount::Below { score, min, max } => {
                if !(score.is_finite()) {
                    return Err(invalid(
                        "remask threshold",
                        alloc::format!("{score} must be a finite score, e.g. below:0.5"),
                    ));
                }
                if !(0.0..=1.0).contains(&min) || !(0.0..=1.0).contains(&max) || min > max {
                    return Err(invalid(
                        "remask bounds",
                        alloc::format!("{min}..{max} must be fractions with 0 ≤ min ≤ max ≤ 1, e.g. below:0.5:0.05..0.5"),
                    ));
                }
                Ok(())
            }
            RemaskAmount::Fraction(_) => Ok(()),
        }
    }
}

impl From<f64> for RemaskAmount {
    fn from(ratio: f64) -> Self {
        RemaskAmount::Fraction(ratio)
    }
}

impl fmt::Display for RemaskAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RemaskAmount::Fraction(r) => write!(f, "{r}"),
            RemaskAmount::Below { score, min, max } if min == 0.0 && max == 1.0 => {
                write!(f, "below:{score}")
            }
            RemaskAmount::Below { score, min, max } => write!(f, "below:{score}:{min}..{max}"),
        }
    }
}

impl FromStr for RemaskAmount {
    type Err = Error;

    /// `γ` (a fraction in (0, 1]), `below:c`, or `below:c:min..max`.
    fn from_str(text: &str) -> Result<Self, Error> {
        const WHAT: &str = "remask amount";
        let t = text.trim();
        let number = |v: &str| -> Result<f64, Error> {
            v.trim().parse::<f64>().map_err(|_| {
                parse_error(WHAT, text, alloc::format!("{:?} is not a number; write γ (0.25), below:c (below:0.5) or below:c:min..max (below:0.5:0.05..0.5)", v.trim()))
            })
        };
        let amount = match t.strip_prefix("below:") {
            None => RemaskAmount::Fraction(number(t)?),
            Some(rest) => match rest.split_once(':') {
                None => RemaskAmount::Below {
                    score: number(rest)?,
                    min: 0.0,
                    max: 1.0,
                },
                Some((c, bounds)) => {
                    let (lo, hi) = bounds.split_once("..").ok_or_else(|| {
                        parse_error(
                            WHAT,
                            text,
                            "bounds are written min..max, e.g. below:0.5:0.05..0.5",
                        )
                    })?;
                    RemaskAmount::Below {
                        score: number(c)?,
                        min: number(lo)?,
                        max: number(hi)?,
                    }
                }
            },
        };
        amount
            .validate()
            .map_err(|e| parse_error(WHAT, text, e.to_string()))?;
        Ok(amount)
    }
}

/// `floor(ratio · n)` with a 1e-9 tolerance.
///
/// ```
/// assert_eq!(did_core::refine::remask_count(0.29, 100), 29);
/// assert_eq!(did_core::refine::remask_count(0.25, 1023), 255);
/// ```
pub fn remask_count(ratio: f64, n: usize) -> usize {
    let c = libm::floor(ratio * n as f64 + 1e-9);
    if c <= 0.0 {
        0
    } else {
        (c as usize).min(n)
    }
}

/// Picks, among the eligible positions, the [`RemaskAmount::count`] (for a ratio γ:
/// `floor(γ · n)`) with the lowest scores in each scope unit (the whole sequence, or
/// each `scope_block`), ties to the smaller position. Returns the positions in ascending order.
///
/// ```
/// use did_core::refine::select_lowest;
/// let scores = [f64::INFINITY, 0.9, 0.2, 0.5, 0.2];
/// let eligible = [false, true, true, true, true];
/// assert_eq!(select_lowest(&scores, &eligible, 0.5, None), vec![2, 4]);
/// ```
pub fn select_lowest(
    scores: &[f64],
    eligible: &[bool],
    amount: impl Into<RemaskAmount>,
    scope_block: Option<usize>,
) -> Vec<usize> {
    let amount = amount.into();
    assert_eq!(
        scores.len(),
        eligible.len(),
        "select_lowest: one score per position"
    );
    let unit = scope_block
        .filter(|&b| b > 0)
        .unwrap_or(scores.len().max(1));
    let mut out = Vec::new();
    let mut candidates: Vec<usize> = Vec::new();
    let mut unit_scores: Vec<f64> = Vec::new();
    for start in (0..scores.len()).step_by(unit) {
        let end = (start + unit).min(scores.len());
        candidates.clear();
        candidates.extend((start..end).filter(|&p| eligible[p]));
        unit_scores.clear();
        unit_scores.extend(candidates.iter().map(|&p| scores[p]));
        let k = amount.count(&unit_scores);
        if k == 0 {
            continue;
        }
        let rank =
            |a: &usize, b: &usize| -> Ordering { scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)) };
        if k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, rank);
        }
        let first = out.len();
        out.extend_from_slice(&candidates[..k]);
        out[first..].sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, TestResult};

    quickcheck! {
        fn picks_the_exact_count_of_eligible_lowest(scores: Vec<u8>, mask: Vec<bool>, ratio: u8, block: u8) -> TestResult {
            let n = scores.len();
            if n == 0 { return TestResult::discard(); }
            let scores: Vec<f64> = scores.iter().map(|&s| f64::from(s % 16)).collect();
            let eligible: Vec<bool> = (0..n).map(|i| mask.get(i).copied().unwrap_or(true)).collect();
            let ratio = (f64::from(ratio) + 1.0) / 256.0;
            let unit = if block % 2 == 0 { None } else { Some(usize::from(block % 9) + 1) };
            let picked = select_lowest(&scores, &eligible, ratio, unit);
            let size = unit.unwrap_or(n);
            for start in (0..n).step_by(size) {
                let end = (start + size).min(n);
                let elig: Vec<usize> = (start..end).filter(|&p| eligible[p]).collect();
                let mine: Vec<usize> = picked.iter().copied().filter(|&p| p >= start && p < end).collect();
                if mine.len() != remask_count(ratio, elig.len()) { return TestResult::error("wrong count"); }
                if mine.iter().any(|&p| !eligible[p]) { return TestResult::error("ineligible position"); }
                // Every picked one ranks at or below every unpicked eligible one.
                for &p in &mine {
                    for &q in elig.iter().filter(|q| !mine.contains(q)) {
                        if (scores[p], p) > (scores[q], q) { return TestResult::error("not the lowest"); }
                    }
                }
            }
            TestResult::from_bool(picked.windows(2).all(|w| w[0] < w[1]))
        }
    }

    #[test]
    fn ties_go_to_the_smaller_position() {
        assert_eq!(select_lowest(&[1.0; 8], &[true; 8], 0.25, None), vec![0, 1]);
    }

    #[test]
    fn count_rounds_down_exactly() {
        assert_eq!(remask_count(0.25, 3), 0);
        assert_eq!(remask_count(1.0, 7), 7);
        assert_eq!(remask_count(0.7, 10), 7);
        assert_eq!(remask_count(0.5, 0), 0);
    }
}
