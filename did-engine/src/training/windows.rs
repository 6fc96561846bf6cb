//! What a training step reads: random windows of the token shard, addressed by (seed, micro-step,
//! sequence) so that a resumed run reads what the uninterrupted one would, and the objective's
//! batch built from them.

use did_core::model::{causal_batch, diffusion_batch, ResolvedBlockSizes, TrainBatch};
use did_core::rng::{Purpose, RngStream};
use did_core::schedule::TrainingSchedule;

use super::Objective;
use crate::data::shard::Shard;
use crate::Error;

/// Random windows of `len` tokens, addressed by (seed, micro-step, sequence): stateless, so
/// resume is exact.
pub fn windows(shard: &Shard, len: usize, batch: usize, seed: u64, micro_step: u32) -> Vec<u32> {
    let room = (shard.len() - len + 1) as f64;
    let mut out = vec![0u32; batch * len];
    for (k, w) in out.chunks_mut(len).enumerate() {
        let u = RngStream::new(seed, Purpose::DataOrder, k as u32, micro_step).uniform(0, 0);
        let start = ((u * room) as usize).min(shard.len() - len);
        shard.read(start, w);
    }
    out
}

/// Builds the objective's batches: everything but the tokens and the step is fixed for a run.
#[derive(Debug, Clone)]
pub struct BatchMaker {
    /// What is trained.
    pub objective: Objective,
    /// The mix-scale objective's block sizes resolved at the length (`None` otherwise, and for
    /// validation, which uses the whole length).
    pub blocks: Option<ResolvedBlockSizes>,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Sequence length.
    pub len: usize,
    /// The `[MASK]` token.
    pub mask: u32,
    /// Seed of the block sizes, diffusion times and masks.
    pub seed: u64,
}

impl BatchMaker {
    /// The batch of windows `x` for optimizer step `step`, micro-batch `micro` (the mix-scale
    /// block size is drawn per optimizer step, the times and masks per micro-batch).
    pub fn make(&self, x: &[u32], step: u32, micro: u32) -> Result<TrainBatch, Error> {
        let bad = |e: did_core::Error| Error::Training(e.to_string());
        let block = match &self.objective {
            Objective::Ar => return causal_batch(x, self.batch, self.len).map_err(bad),
            Objective::Bd3(b) => *b,
            Objective::Mdlm => self.len,
            Objective::MixScale(_) => self
                .blocks
                .as_ref()
                .map_or(self.len, |d| d.sample(self.seed, step)),
        };
        diffusion_batch(
            x,
            self.batch,
            self.len,
            block,
            &TrainingSchedule::default(),
            self.mask,
            self.seed,
            micro,
        )
        .map_err(bad)
    }
}
