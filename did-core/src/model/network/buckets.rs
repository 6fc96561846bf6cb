//! Gradient buckets: which ranges of the gradient buffer hold their final values at each stage
//! of one backward, so a data-parallel trainer can start summing them over the ranks while the
//! backward goes on with the layers below (docs/training.md, "Overlapping the sums").
//!
//! The backward runs the head (and final norm) first, then the blocks from last to first, then
//! the inputs: embeddings, the conditioning MLP and every adaLN projection (their gradients come
//! from the modulation vectors the blocks leave behind). A tied GPT-2 head shares the embedding's
//! tensor, so it is final only with the inputs.

use alloc::vec::Vec;
use core::ops::Range;

use crate::model::network::params::ParamTable;

/// A point in the backward after which some gradients are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackwardStage {
    /// After the loss, the output head and the final norm.
    Head,
    /// After block `l`'s backward.
    Block(usize),
    /// After the embeddings and the conditioning: the end of the backward.
    Inputs,
}

/// The ranges of the gradient buffer that become final at each [`BackwardStage`], in the order
/// the backward reaches the stages. Together they cover every parameter exactly once.
///
/// ```
/// use did_core::model::{Architecture, BackwardStage, GradientBuckets, ModelConfig, ParamTable};
/// let table = ParamTable::new(&ModelConfig::preset("tiny", Architecture::Dit)?);
/// let buckets = GradientBuckets::new(&table);
/// let stages: Vec<_> = buckets.stages().map(|(stage, _)| stage).collect();
/// assert_eq!(stages.first(), Some(&BackwardStage::Head));
/// assert_eq!(stages.last(), Some(&BackwardStage::Inputs));
/// let covered: usize = buckets.stages().flat_map(|(_, r)| r).map(|r| r.len()).sum();
/// assert_eq!(covered, table.total());
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradientBuckets {
    stages: Vec<(BackwardStage, Vec<Range<usize>>)>,
}

impl GradientBuckets {
    /// The buckets of a parameter table: one per stage, each a few contiguous ranges.
    pub fn new(table: &ParamTable) -> Self {
        let layout = table.layout();
        let tied = layout.head.0 == layout.embed;
        let head = [
            (!tied).then_some(layout.head.0),
            layout.head.1,
            Some(layout.final_norm.0),
            layout.final_norm.1,
        ];
        let stage_of = |offset: usize| {
            if head.contains(&Some(offset)) {
                return BackwardStage::Head;
            }
            for (l, b) in layout.blocks.iter().enumerate() {
                let pairs = [b.norm1, b.qkv, b.attn_out, b.norm2];
                let in_block = pairs
                    .iter()
                    .any(|&(w, bias)| w == offset || bias == Some(offset))
                    || [b.fc1.0, b.fc1.1, b.fc2.0, b.fc2.1].contains(&offset);
                if in_block {
                    return BackwardStage::Block(l);
                }
            }
            BackwardStage::Inputs
        };
        let order = core::iter::once(BackwardStage::Head)
            .chain((0..layout.blocks.len()).rev().map(BackwardStage::Block))
            .chain(core::iter::once(BackwardStage::Inputs));
        let mut stages = Vec::new();
        for stage in order {
            let mut ranges: Vec<Range<usize>> = Vec::new();
            // Entries are in offset order, so neighbours in the same stage merge.
            for e in table
                .entries()
                .iter()
                .filter(|e| stage_of(e.offset) == stage)
            {
                let r = e.offset..e.offset + e.len();
                match ranges.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => ranges.push(r),
                }
            }
            if !ranges.is_empty() {
                stages.push((stage, ranges));
            }
        }
        GradientBuckets { stages }
    }

    /// The stages in backward order, each with the ranges that are final after it.
    pub fn stages(&self) -> impl Iterator<Item = (BackwardStage, &[Range<usize>])> {
        self.stages.iter().map(|(s, r)| (*s, r.as_slice()))
    }

    /// The ranges final after `stage` (empty when none are).
    pub fn at(&self, stage: BackwardStage) -> &[Range<usize>] {
        self.stages
            .iter()
            .find(|(s, _)| *s == stage)
            .map_or(&[], |(_, r)| r.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Architecture, ModelConfig};

    fn buckets(arch: Architecture) -> (ParamTable, GradientBuckets) {
        let table = ParamTable::new(&ModelConfig::preset("tiny", arch).unwrap());
        let b = GradientBuckets::new(&table);
        (table, b)
    }

    #[test]
    fn buckets_cover_every_parameter_once() {
        for arch in [Architecture::Dit, Architecture::Gpt2] {
            let (table, b) = buckets(arch);
            let mut seen = alloc::vec![0u8; table.total()];
            for (_, ranges) in b.stages() {
                for r in ranges {
                    seen[r.clone()].iter_mut().for_each(|s| *s += 1);
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{arch:?}");
        }
    }

    #[test]
    fn each_block_is_its_own_bucket_and_adaln_waits_for_the_inputs() {
        let (table, b) = buckets(Architecture::Dit);
        let layers = table.layout().blocks.len();
        let stages: Vec<_> = b.stages().map(|(s, _)| s).collect();
        assert_eq!(stages.len(), layers + 2);
        for (l, block) in table.layout().blocks.iter().enumerate() {
            let ranges = b.at(BackwardStage::Block(l));
            assert_eq!(ranges.len(), 1, "block {l} is one contiguous range");
            let ada = block.ada.unwrap().0;
            assert!(!ranges[0].contains(&ada));
            assert!(b.at(BackwardStage::Inputs).iter().any(|r| r.contains(&ada)));
        }
    }

    #[test]
    fn a_tied_head_is_final_only_with_the_embedding() {
        let (table, b) = buckets(Architecture::Gpt2);
        let embed = table.layout().embed;
        assert!(b
            .at(BackwardStage::Head)
            .iter()
            .all(|r| !r.contains(&embed)));
        assert!(b
            .at(BackwardStage::Inputs)
            .iter()
            .any(|r| r.contains(&embed)));
    }
}
