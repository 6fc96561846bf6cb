//! Stage plans: for each stage its block size, what is remasked before it, and
//! how its blocks are filled.
//!
//! Grammar (spaces allowed around every item):
//!
//! ```text
//! plan   := draft ( "," refine )*
//! draft  := block [ "@" rule ]
//! refine := block ":" remask [ "@" rule ]
//! block  := integer ≥ 1 | "L"               ("L" = the sequence length)
//! remask := ratio                           the lowest floor(ratio · n), ratio in (0, 1]
//!         | "below:" c [ ":" min ".." max ] every score below c, between the fractions
//! rule   := "first-hitting" | "ddpm:" T | "threshold:" τ | "entropy:" β | "topk:" k
//! ```
//!
//! `4` drafts with blocks of 4 and stops. `4,1024:0.25` drafts at 4, remasks
//! the least confident 25 % and regenerates them with one block of 1024.
//! `4,64:0.5,L:0.25` has three stages. `4@threshold:0.9,L:below:0.5:0.05..0.5@entropy:0.3`
//! drafts revealing every token surer than 0.9 per call, remasks the tokens drawn
//! with confidence below 0.5 (at least 5 %, at most half of them) and refines them
//! under an entropy budget of 0.3 nats per call. A stage without a rule uses the
//! sampler's (`--sampler`, first-hitting by default).

use alloc::string::ToString;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use crate::error::{invalid, parse_error};
use crate::refine::remask::RemaskAmount;
use crate::sample::BlockUpdate;
use crate::Error;

/// A block size as written: a number, or the whole sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockSpec {
    /// A fixed size.
    Fixed(usize),
    /// The sequence length (`L`): one block, full bidirectional attention.
    Full,
}

impl BlockSpec {
    /// The size for sequences of `seq_len`.
    pub fn resolve(self, seq_len: usize) -> usize {
        match self {
            BlockSpec::Fixed(n) => n,
            BlockSpec::Full => seq_len,
        }
    }
}

impl fmt::Display for BlockSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockSpec::Fixed(n) => write!(f, "{n}"),
            BlockSpec::Full => f.write_str("L"),
        }
    }
}

/// Parses a block size (`4`, `1024`, `L`); `what` names the setting in errors.
pub(crate) fn parse_block(text: &str, what: &'static str, whole: &str) -> Result<BlockSpec, Error> {
    let t = text.trim();
    if t == "L" || t == "l" {
        return Ok(BlockSpec::Full);
    }
    match t.parse::<usize>() {
        Ok(0) => Err(parse_error(what, whole, "a block size must be at least 1")),
        Ok(n) => Ok(BlockSpec::Fixed(n)),
        Err(_) => Err(parse_error(
            what,
            whole,
            alloc::format!("{t:?} is not a block size; write a positive integer or L"),
        )),
    }
}

/// One stage as written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageSpec {
    /// The attention block size.
    pub block: BlockSpec,
    /// What is remasked before this stage; `None` for the draft.
    pub remask: Option<RemaskAmount>,
    /// How its blocks are filled; `None` for the sampler's rule.
    pub update: Option<BlockUpdate>,
}

/// A stage plan as written, not yet checked against a sequence length.
///
/// ```
/// use did_core::refine::StagePlan;
/// let plan: StagePlan = "4, 64:0.5, L:0.25".parse()?;
/// assert_eq!(plan.to_string(), "4,64:0.5,L:0.25");
/// let stages = plan.resolve(1024)?;
/// assert_eq!(stages.stages()[2].block_size, 1024);
/// assert!("4,1024".parse::<StagePlan>().is_err()); // a refine stage needs a ratio
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    stages: Vec<StageSpec>,
}

impl StagePlan {
    /// The stages as written.
    pub fn stages(&self) -> &[StageSpec] {
        &self.stages
    }

    /// Checks the plan for sequences of `seq_len`, requiring a final global
    /// stage (block = `seq_len`) whenever there is a refine stage.
    pub fn resolve(&self, seq_len: usize) -> Result<ResolvedPlan, Error> {
        self.resolve_with(seq_len, true)
    }

    /// Like [`Self::resolve`]; `require_global_final = false` allows a last
    /// refine stage smaller than the sequence (the "small refine block" ablation).
    pub fn resolve_with(
        &self,
        seq_len: usize,
        require_global_final: bool,
    ) -> Result<ResolvedPlan, Error> {
        if seq_len == 0 {
            return Err(invalid("sequence length", "must be at least 1"));
        }
        let mut out = Vec::with_capacity(self.stages.len());
        let mut previous = 0;
        for (i, s) in self.stages.iter().enumerate() {
            let b = s.block.resolve(seq_len);
            if seq_len % b != 0 {
                return Err(invalid(
                    "stage plan",
                    alloc::format!(
                        "stage {} block size {b} does not divide the sequence length {seq_len}; use a divisor such as {}",
                        i + 1,
                        nearest_divisor(seq_len, b)
                    ),
                ));
            }
            if b < previous {
                return Err(invalid(
                    "stage plan",
                    alloc::format!(
                        "stage {} block size {b} is smaller than the previous stage's {previous}; block sizes must not decrease",
                        i + 1
                    ),
                ));
            }
            previous = b;
            out.push(Stage {
                block_size: b,
                remask: s.remask,
                update: s.update,
            });
        }
        if require_global_final && out.len() > 1 && previous != seq_len {
            return Err(invalid(
                "stage plan",
                alloc::format!(
                    "the last stage has block size {previous}, not the sequence length {seq_len}; end with L:<ratio> \
                     for a global refine, or allow a local final stage explicitly"
                ),
            ));
        }
        Ok(ResolvedPlan {
            seq_len,
            stages: out,
        })
    }
}

fn nearest_divisor(n: usize, near: usize) -> usize {
    (1..=n)
        .filter(|d| n % d == 0)
        .min_by_key(|&d| d.abs_diff(near))
        .unwrap_or(1)
}

impl FromStr for StagePlan {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        const WHAT: &str = "stage plan";
        if text.trim().is_empty() {
            return Err(parse_error(
                WHAT,
                text,
                "empty; write e.g. 4 (draft only) or 4,L:0.25",
            ));
        }
        let mut stages = Vec::new();
        for (i, item) in text.split(',').enumerate() {
            let (head, rule) = match item.split_once('@') {
                Some((h, r)) => (h, Some(r)),
                None => (item, None),
            };
            let (block, remask) = match head.split_once(':') {
                Some((b, r)) => (b, Some(r)),
                None => (head, None),
            };
            let block = parse_block(block, WHAT, text)?;
            let remask =
                match (i, remask) {
                    (0, Some(_)) => return Err(parse_error(
                        WHAT,
                        text,
                        "the first stage is the draft and remasks nothing; write it without :ratio",
                    )),
                    (0, None) => None,
                    (_, None) => {
                        return Err(parse_error(
                            WHAT,
                            text,
                            alloc::format!(
                        "stage {} needs a remask amount, e.g. {block}:0.25 or {block}:below:0.5",
                        i + 1
                    ),
                        ))
                    }
                    (_, Some(r)) => Some(parse_remask(r, text)?),
                };
            let update = match rule {
                None => None,
                Some(r) => Some(r.parse::<BlockUpdate>().map_err(|e| {
                    parse_error(WHAT, text, alloc::format!("stage {}: {e}", i + 1))
                })?),
            };
            stages.push(StageSpec {
                block,
                remask,
                update,
            });
        }
        Ok(StagePlan { stages })
    }
}

/// A remask amount inside a plan; a bad ratio keeps the plan's own wording.
fn parse_remask(text: &str, whole: &str) -> Result<RemaskAmount, Error> {
    if text.trim().starts_with("below") {
        return text
            .parse::<RemaskAmount>()
            .map_err(|e| parse_error("stage plan", whole, e.to_string()));
    }
    parse_ratio(text, "stage plan", whole).map(RemaskAmount::Fraction)
}

pub(crate) fn parse_ratio(text: &str, what: &'static str, whole: &str) -> Result<f64, Error> {
    let t = text.trim();
    match t.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        Ok(r) => Err(parse_error(
            what,
            whole,
            alloc::format!("ratio {r} must be in (0, 1]"),
        )),
        Err(_) => Err(parse_error(
            what,
            whole,
            alloc::format!("{t:?} is not a number in (0, 1]"),
        )),
    }
}

impl fmt::Display for StagePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.stages.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", s.block)?;
            if let Some(r) = s.remask {
                write!(f, ":{r}")?;
            }
            if let Some(u) = s.update {
                write!(f, "@{u}")?;
            }
        }
        Ok(())
    }
}

/// One stage, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    /// The attention block size; divides the sequence length.
    pub block_size: usize,
    /// What is remasked before the stage; `None` for the draft.
    pub remask: Option<RemaskAmount>,
    /// How its blocks are filled; `None` for the sampler's rule.
    pub update: Option<BlockUpdate>,
}

/// A plan checked against a sequence length.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedPlan {
    seq_len: usize,
    stages: Vec<Stage>,
}

impl ResolvedPlan {
    /// The stages; the first is the draft.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The sequence length it was checked for.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    #[test]
    fn errors_name_the_problem() {
        let e = |s: &str| s.parse::<StagePlan>().unwrap_err().to_string();
        assert!(e("").contains("empty"));
        assert!(e("4:0.5").contains("first stage"));
        assert!(e("4,L").contains("needs a remask amount"));
        assert!(e("4@threshold:2").contains("(0, 1]"));
        assert!(e("4@fast").contains("unknown rule"));
        assert!(e("4,L:below:0.5:0.6..0.2").contains("min ≤ max"));
        assert!(e("4,L:below:0.5:0.1").contains("min..max"));
        assert!(e("4,L:below:x").contains("not a number"));
        assert!(e("4,L:0").contains("(0, 1]"));
        assert!(e("4,L:1.5").contains("(0, 1]"));
        assert!(e("4,x:0.2").contains("not a block size"));
        assert!(e("0").contains("at least 1"));
        let r = |s: &str| {
            s.parse::<StagePlan>()
                .unwrap()
                .resolve(1024)
                .unwrap_err()
                .to_string()
        };
        assert!(r("3").contains("does not divide"));
        assert!(r("16,4:0.5").contains("must not decrease"));
        assert!(r("4,64:0.5").contains("not the sequence length"));
        assert!("4,64:0.5"
            .parse::<StagePlan>()
            .unwrap()
            .resolve_with(1024, false)
            .is_ok());
    }

    quickcheck! {
        fn display_round_trips(sizes: Vec<u8>, ratios: Vec<u8>) -> bool {
            if sizes.is_empty() { return true; }
            let mut text = alloc::format!("{}", u32::from(sizes[0]) + 1);
            for (i, s) in sizes.iter().enumerate().skip(1) {
                let r = f64::from(ratios.get(i).copied().unwrap_or(1)) / 255.0;
                let r = if r == 0.0 { 0.5 } else { r };
                text.push_str(&alloc::format!(",{}:{}", u32::from(*s) + 1, r));
            }
            let plan: StagePlan = text.parse().unwrap();
            plan.to_string().parse::<StagePlan>().unwrap() == plan
        }

        fn rules_and_adaptive_amounts_round_trip(tau: u8, budget: u8, k: u8, c: u8, lo: u8, hi: u8) -> bool {
            let (lo, hi) = (u32::from(lo.min(hi)), u32::from(lo.max(hi)));
            let text = alloc::format!(
                "4@threshold:{},16:below:{}:{}..{}@entropy:{},L:0.25@topk:{}",
                (f64::from(tau) + 1.0) / 256.0, f64::from(c) / 255.0, f64::from(lo) / 255.0,
                f64::from(hi) / 255.0, f64::from(budget) / 8.0, u32::from(k) + 1
            );
            let plan: StagePlan = text.parse().unwrap();
            plan.to_string().parse::<StagePlan>().unwrap() == plan
        }

        fn parser_never_panics(text: String) -> bool {
            let _ = text.parse::<StagePlan>().map(|p| p.resolve(1024));
            true
        }
    }
}
