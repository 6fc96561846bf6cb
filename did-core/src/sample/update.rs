//! Within-block updates: how the masked positions of one block are revealed.
//!
//! Both updates decide *which* positions are revealed at a step before the
//! model is called (those decisions do not depend on the logits), and then ask
//! the denoiser for logits at exactly those positions. So a step that reveals
//! nothing costs no call — BD3-LM's "caching" — and the output head runs only
//! where a token is drawn. NFE is the number of denoiser calls made.
//!
//! The RNG step of a sequence counts the updates in which it had a masked
//! position, so a sequence draws the same numbers whatever batch it is in.

use alloc::vec::Vec;
use core::ops::Range;

use crate::backend::DrawSpec;
use crate::denoiser::{Denoiser, HostDrawScratch, OutputPosition};
use crate::rng::{Purpose, RngStream};
use crate::sample::batch::SequenceBatch;
use crate::sample::categorical::{Confidence, SampledToken};
use crate::sample::nucleus::Nucleus;
use crate::{error::invalid, Error};

/// How a block's masked positions are revealed.
///
/// ```
/// use did_core::sample::BlockUpdate;
/// // About two tokens per call inside blocks of 16.
/// let update = BlockUpdate::DdpmCaching { steps: 8 };
/// assert_ne!(update, BlockUpdate::default()); // the default is first-hitting
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockUpdate {
    /// One uniformly chosen masked position per call (Zheng et al.'s
    /// first-hitting sampler; every reported BD3-LM number, bd3lm.md §4.3).
    /// A block with `n` masked positions takes exactly `n` calls.
    #[default]
    FirstHitting,
    /// The DDPM update on the grid `t_i = 1 − i/T`, `s = t_i − 1/T`, `i = 0..T`:
    /// each masked position stays masked with probability `s/t = (T−i−1)/(T−i)`,
    /// otherwise it is drawn. The last step has `s = 0` and reveals everything
    /// left, so the reference's division by zero at `t = 0` (bd3lm.md §4.4)
    /// cannot happen. `T` ≈ block size / k reveals about k tokens per call.
    DdpmCaching {
        /// `T`, steps per block (≥ 1).
        steps: u32,
    },
}

/// Everything the within-block sampler needs besides the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Top-p filtering of every draw.
    pub nucleus: Nucleus,
    /// The within-block update.
    pub update: BlockUpdate,
    /// The seed of every stream.
    pub seed: u64,
    /// At most this many logits rows per denoiser call (bounds host memory:
    /// rows × vocabulary × 4 bytes); larger steps are split into several calls.
    pub max_outputs_per_call: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            nucleus: Nucleus::default(),
            update: BlockUpdate::default(),
            seed: 0,
            max_outputs_per_call: 1024,
        }
    }
}

impl SamplerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Error> {
        if let BlockUpdate::DdpmCaching { steps: 0 } = self.update {
            return Err(invalid("DDPM steps", "T must be at least 1 step per block"));
        }
        if self.max_outputs_per_call == 0 {
            return Err(invalid("max outputs per call", "must be at least 1"));
        }
        Ok(())
    }
}

/// Reusable buffers of the block sampler.
#[derive(Debug, Default)]
pub struct BlockScratch {
    reveals: Vec<OutputPosition>,
    specs: Vec<DrawSpec>,
    tokens: Vec<SampledToken>,
    drawn: Vec<(usize, SampledToken)>,
    host: HostDrawScratch,
    masked: Vec<usize>,
    active: Vec<usize>,
}

/// Reveals every masked position of `block` in every sequence of `batch`,
/// with attention block size `block_size`. Returns the number of denoiser calls.
///
/// ```
/// use did_core::denoiser::{DenoiseRequest, Denoiser};
/// use did_core::sample::update::{fill_block, BlockScratch};
/// use did_core::sample::{BlockUpdate, SamplerConfig, SequenceBatch};
/// struct Uniform;
/// impl Denoiser for Uniform {
///     type Error = core::convert::Infallible;
///     fn vocab_size(&self) -> usize { 5 }
///     fn mask_id(&self) -> u32 { 4 }
///     fn logits(&mut self, _: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
///         out.fill(0.0);
///         Ok(())
///     }
/// }
/// let mut batch = SequenceBatch::from_prompts(&[&[0]], 8, 4, 0);
/// let config = SamplerConfig { update: BlockUpdate::DdpmCaching { steps: 2 }, ..SamplerConfig::default() };
/// let calls = fill_block(&mut Uniform, &mut batch, 4..8, 4, &config, &mut BlockScratch::default())?;
/// assert!(calls <= 2 && batch.masked_in(0, 4..8).next().is_none());
/// # Ok::<(), core::convert::Infallible>(())
/// ```
pub fn fill_block<D: Denoiser>(
    denoiser: &mut D,
    batch: &mut SequenceBatch,
    block: Range<usize>,
    block_size: usize,
    config: &SamplerConfig,
    scratch: &mut BlockScratch,
) -> Result<u32, D::Error> {
    let mut calls = 0;
    match config.update {
        BlockUpdate::FirstHitting => {
            while batch.any_masked_in(block.clone()) {
                scratch.reveals.clear();
                for seq in 0..batch.batch() {
                    scratch.masked.clear();
                    scratch.masked.extend(batch.masked_in(seq, block.clone()));
                    if scratch.masked.is_empty() {
                        continue;
                    }
                    let stream = RngStream::new(
                        config.seed,
                        Purpose::RevealPosition,
                        batch.sample_ids[seq],
                        batch.steps[seq],
                    );
                    let pick = (stream.uniform(0, 0) * scratch.masked.len() as f64) as usize;
                    let pos = scratch.masked[pick.min(scratch.masked.len() - 1)];
                    scratch.reveals.push(OutputPosition {
                        seq: seq as u32,
                        pos: pos as u32,
                    });
                }
                calls += reveal(denoiser, batch, &block, block_size, config, scratch)?;
                // First-hitting reveals one position in every sequence that had one.
                for r in &scratch.reveals {
                    let s = r.seq as usize;
                    batch.steps[s] = batch.steps[s].wrapping_add(1);
                }
            }
        }
        BlockUpdate::DdpmCaching { steps } => {
            let steps = steps.max(1);
            for i in 0..steps {
                if !batch.any_masked_in(block.clone()) {
                    break;
                }
                let stay = f64::from(steps - i - 1) / f64::from(steps - i);
                scratch.reveals.clear();
                scratch.active.clear();
                for seq in 0..batch.batch() {
                    let stream = RngStream::new(
                        config.seed,
                        Purpose::StayMasked,
                        batch.sample_ids[seq],
                        batch.steps[seq],
                    );
                    let mut any = false;
                    for pos in batch.masked_in(seq, block.clone()) {
                        any = true;
                        if stream.uniform(pos as u32, 0) >= stay {
                            scratch.reveals.push(OutputPosition {
                                seq: seq as u32,
                                pos: pos as u32,
                            });
                        }
                    }
                    if any {
                        scratch.active.push(seq);
                    }
                }
                calls += reveal(denoiser, batch, &block, block_size, config, scratch)?;
                // Every sequence that still had a masked position moved one step.
                for &seq in &scratch.active {
                    batch.steps[seq] = batch.steps[seq].wrapping_add(1);
                }
            }
        }
    }
    Ok(calls)
}

/// Draws tokens at `scratch.reveals`, all from the tokens as they were before
/// this step, then writes them. Returns the number of calls made.
fn reveal<D: Denoiser>(
    denoiser: &mut D,
    batch: &mut SequenceBatch,
    block: &Range<usize>,
    block_size: usize,
    config: &SamplerConfig,
    scratch: &mut BlockScratch,
) -> Result<u32, D::Error> {
    let mask_id = batch.mask_id();
    let mut calls = 0;
    scratch.drawn.clear();
    for chunk in scratch.reveals.chunks(config.max_outputs_per_call) {
        scratch.specs.clear();
        scratch.specs.extend(chunk.iter().map(|out| DrawSpec {
            stream: RngStream::new(
                config.seed,
                Purpose::Categorical,
                batch.sample_ids[out.seq as usize],
                batch.steps[out.seq as usize],
            ),
            row: out.pos,
        }));
        scratch.tokens.clear();
        scratch.tokens.resize(
            chunk.len(),
            SampledToken {
                id: mask_id,
                confidence: Confidence::PINNED,
            },
        );
        let request = batch.request(block_size, block.clone(), chunk);
        denoiser.draw(
            &request,
            mask_id,
            &config.nucleus,
            &scratch.specs,
            &mut scratch.host,
            &mut scratch.tokens,
        )?;
        calls += 1;
        for (out, &token) in chunk.iter().zip(&scratch.tokens) {
            let index = out.seq as usize * batch.seq_len() + out.pos as usize;
            scratch.drawn.push((index, token));
        }
    }
    for &(index, token) in &scratch.drawn {
        batch.tokens[index] = token.id;
        batch.confidence[index] = token.confidence;
    }
    Ok(calls)
}
