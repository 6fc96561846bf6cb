//! Mix-scale training: the block size of each optimizer step is drawn from a
//! distribution, so one network learns to draft with small blocks and to
//! refine with the whole sequence. The paper's default is bimodal:
//! `4:0.9,L:0.1` (block 4 with probability 0.9, the global block otherwise).
//!
//! The draw is per optimizer step (every micro-batch and sequence of a step
//! shares one attention mask), from [`Purpose::MixScale`] at `step`.

use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use crate::error::{invalid, parse_error};
use crate::mask::check_block;
use crate::refine::plan::{parse_block, BlockSpec};
use crate::rng::{Purpose, RngStream};
use crate::Error;

/// A distribution over block sizes, as written.
///
/// ```
/// use did_core::model::BlockSizeDistribution;
/// let d: BlockSizeDistribution = "4:0.9,L:0.1".parse()?;
/// let d = d.resolve(1024)?;
/// let big = (0..10_000).filter(|&s| d.sample(7, s) == 1024).count();
/// assert!((800..1200).contains(&big));
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSizeDistribution {
    entries: Vec<(BlockSpec, f64)>,
}

impl BlockSizeDistribution {
    /// The entries as written.
    pub fn entries(&self) -> &[(BlockSpec, f64)] {
        &self.entries
    }

    /// Checks every block size against the sequence length.
    pub fn resolve(&self, seq_len: usize) -> Result<ResolvedBlockSizes, Error> {
        let mut entries = Vec::with_capacity(self.entries.len());
        for &(spec, w) in &self.entries {
            let b = spec.resolve(seq_len);
            check_block(seq_len, b)?;
            entries.push((b, w));
        }
        Ok(ResolvedBlockSizes { entries })
    }
}

impl FromStr for BlockSizeDistribution {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        const WHAT: &str = "block-size distribution";
        if text.trim().is_empty() {
            return Err(parse_error(WHAT, text, "empty; write e.g. 4:0.9,L:0.1"));
        }
        let items: Vec<&str> = text.split(',').collect();
        let mut entries = Vec::with_capacity(items.len());
        for item in &items {
            let (block, weight) = match item.split_once(':') {
                Some((b, w)) => (b, Some(w)),
                None if items.len() == 1 => (*item, None),
                None => {
                    return Err(parse_error(
                        WHAT,
                        text,
                        alloc::format!(
                            "{:?} needs a probability, e.g. {}:0.1",
                            item.trim(),
                            item.trim()
                        ),
                    ))
                }
            };
            let block = parse_block(block, WHAT, text)?;
            let weight = match weight {
                None => 1.0,
                Some(w) => match w.trim().parse::<f64>() {
                    Ok(x) if x > 0.0 && x <= 1.0 => x,
                    _ => {
                        return Err(parse_error(
                            WHAT,
                            text,
                            alloc::format!("{:?} is not a probability in (0, 1]", w.trim()),
                        ))
                    }
                },
            };
            if entries.iter().any(|&(b, _)| b == block) {
                return Err(parse_error(
                    WHAT,
                    text,
                    alloc::format!("block size {block} is listed twice"),
                ));
            }
            entries.push((block, weight));
        }
        let sum: f64 = entries.iter().map(|&(_, w)| w).sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(invalid(
                WHAT,
                alloc::format!(
                    "the probabilities of {text:?} sum to {sum}, not 1; adjust them so they do"
                ),
            ));
        }
        Ok(BlockSizeDistribution { entries })
    }
}

impl fmt::Display for BlockSizeDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (b, w)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{b}:{w}")?;
        }
        Ok(())
    }
}

/// Block sizes with probabilities, checked against a sequence length.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedBlockSizes {
    entries: Vec<(usize, f64)>,
}

impl ResolvedBlockSizes {
    /// The (block size, probability) pairs.
    pub fn entries(&self) -> &[(usize, f64)] {
        &self.entries
    }

    /// The block size of optimizer step `step`.
    pub fn sample(&self, seed: u64, step: u32) -> usize {
        let u = RngStream::new(seed, Purpose::MixScale, 0, step).uniform(0, 0);
        let total: f64 = self.entries.iter().map(|&(_, w)| w).sum();
        let mut acc = 0.0;
        for &(b, w) in &self.entries {
            acc += w / total;
            if u < acc {
                return b;
            }
        }
        self.entries.last().map_or(1, |&(b, _)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    #[test]
    fn errors_name_the_problem() {
        let e = |s: &str| s.parse::<BlockSizeDistribution>().unwrap_err().to_string();
        assert!(e("4:0.9,L:0.2").contains("sum to"));
        assert!(e("4:0.9,L").contains("needs a probability"));
        assert!(e("4:0,L:1").contains("probability in (0, 1]"));
        assert!(e("4:0.5,4:0.5").contains("twice"));
        assert!(e("").contains("empty"));
        assert!("3:0.5,L:0.5"
            .parse::<BlockSizeDistribution>()
            .unwrap()
            .resolve(1024)
            .is_err());
        assert_eq!(
            "16".parse::<BlockSizeDistribution>()
                .unwrap()
                .resolve(64)
                .unwrap()
                .sample(0, 3),
            16
        );
    }

    quickcheck! {
        fn parser_never_panics(text: String) -> bool {
            let _ = text.parse::<BlockSizeDistribution>().map(|d| d.resolve(1024));
            true
        }
        fn samples_are_listed_sizes(seed: u64, step: u32) -> bool {
            let d = "1:0.25,4:0.25,16:0.5".parse::<BlockSizeDistribution>().unwrap().resolve(64).unwrap();
            [1, 4, 16].contains(&d.sample(seed, step))
        }
    }
}
