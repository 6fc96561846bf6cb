//! Ancestral sampling from a causal (GPT-2) model, one token per call with a
//! KV cache: the AR baseline the diffusion samplers are compared with.
//!
//! Draws use the diffusion samplers' own pieces (SUBS softmax without
//! `[MASK]`, the same nucleus, f64 Gumbel-max from the `Categorical` stream
//! with `row` = position), so a seed means the same thing for both families.

use alloc::vec;
use alloc::vec::Vec;

use super::kv_cache::KvCache;
use super::pass::{CacheUse, Inference, PassOutput};
use crate::backend::Backend;
use crate::error::invalid;
use crate::model::{Architecture, ModelError, Transformer};
use crate::rng::{Purpose, RngStream, MAX_SAMPLE};
use crate::sample::categorical::{Confidence, SampledToken};
use crate::sample::DrawSpec;
use crate::sample::Nucleus;

/// What [`CausalSampler::generate`] drew.
#[derive(Debug, Clone, PartialEq)]
pub struct CausalGeneration {
    /// `[batch, len]`: each prompt, then the drawn tokens.
    pub tokens: Vec<u32>,
    /// Tokens of each sequence up to and including its stop token (else `len`).
    pub lengths: Vec<usize>,
    /// Model calls: one per drawn position (the prompt is one call); fewer
    /// when every sequence stopped early.
    pub nfe: u32,
}

/// A causal model with a KV cache, drawing one token per call.
///
/// It needs a causal model (a diffusion model is refused at [`CausalSampler::new`]):
///
/// ```
/// use did_core::model::{Architecture, ModelConfig, Transformer};
/// let judge = Transformer::new(ModelConfig::preset("tiny", Architecture::Gpt2)?)?;
/// assert_eq!(judge.config().architecture, Architecture::Gpt2);
/// # Ok::<(), did_core::Error>(())
/// ```
///
/// A draw with a real backend, checked token by token against uncached
/// logits, is the `causal_sampling` test of the `did-backend-cpu` crate.
pub struct CausalSampler<'a, B: Backend> {
    inference: Inference<'a, B>,
}

impl<'a, B: Backend> CausalSampler<'a, B> {
    /// A sampler over `params` (usually the EMA weights) of a causal model.
    pub fn new(
        be: &'a B,
        model: &'a Transformer,
        params: &'a B::Buffer,
    ) -> Result<Self, ModelError<B::Error>> {
        if model.config().architecture != Architecture::Gpt2 {
            return Err(invalid(
                "model",
                "autoregressive sampling needs a causal (gpt2) model, not a diffusion one",
            )
            .into());
        }
        Ok(CausalSampler {
            inference: Inference::new(be, model, params).map_err(ModelError::Backend)?,
        })
    }

    /// Continues every prompt (all of one length, at least one token) to
    /// `len` tokens. Sequence `s` draws from the streams of sample
    /// `first_sample + s`; with `stop_at`, its length ends after the first
    /// drawn stop token (the batch keeps drawing; the rest is not part of it).
    pub fn generate(
        &mut self,
        prompts: &[&[u32]],
        len: usize,
        nucleus: &Nucleus,
        seed: u64,
        first_sample: u32,
        stop_at: Option<u32>,
    ) -> Result<CausalGeneration, ModelError<B::Error>> {
        let batch = prompts.len();
        let p = prompts.first().map_or(0, |p| p.len());
        if batch == 0 || p == 0 || prompts.iter().any(|q| q.len() != p) {
            return Err(invalid(
                "prompts",
                "need at least one prompt, all of the same non-zero length (BOS at least)",
            )
            .into());
        }
        if first_sample as usize + batch > MAX_SAMPLE as usize + 1 {
            return Err(invalid(
                "sample id",
                alloc::format!(
                    "samples {first_sample}… exceed the {} random streams; start lower",
                    MAX_SAMPLE as usize + 1
                ),
            )
            .into());
        }
        if p >= len {
            return Err(invalid(
                "length",
                alloc::format!("the prompt is {p} tokens, the length only {len}; raise the length"),
            )
            .into());
        }
        let cfg = *self.inference.model().config();
        if len > cfg.context {
            return Err(invalid(
                "length",
                alloc::format!("a causal model has learned positions up to its context of {}; sample at most that many tokens", cfg.context),
            )
            .into());
        }
        let mask = cfg.mask_id;
        let mut cache =
            KvCache::new(self.inference.be, &cfg, batch, len).map_err(ModelError::Backend)?;
        // Sequence s draws from sample first_sample + s, at the row of the position.
        let mut draws: Vec<DrawSpec> = (0..batch)
            .map(|s| DrawSpec {
                stream: RngStream::new(
                    seed,
                    Purpose::Categorical,
                    first_sample.wrapping_add(s as u32),
                    0,
                ),
                row: 0,
            })
            .collect();
        let mut drawn = vec![
            SampledToken {
                id: mask,
                confidence: Confidence::PINNED,
            };
            batch
        ];

        let mut tokens = vec![0u32; batch * len];
        for (s, q) in prompts.iter().enumerate() {
            tokens[s * len..s * len + p].copy_from_slice(q);
        }
        let mut lengths = vec![len; batch];
        let mut fed: Vec<u32> = prompts.iter().flat_map(|q| q.iter().copied()).collect();
        let (mut start, mut nfe) = (0usize, 0u32);
        for pos in p..len {
            let n = fed.len() / batch;
            let outputs: Vec<(usize, usize)> = (0..batch).map(|s| (s, n - 1)).collect();
            self.inference.check_tokens(&fed, batch)?;
            draws.iter_mut().for_each(|d| d.row = pos as u32);
            self.inference
                .pass(
                    &fed,
                    batch,
                    start,
                    1,
                    Some((&mut cache, CacheUse::Commit)),
                    &outputs,
                    PassOutput::Tokens {
                        mask_id: mask,
                        nucleus,
                        draws: &draws,
                        out: &mut drawn,
                    },
                )
                .map_err(ModelError::Backend)?;
            nfe += 1;
            start += n;
            fed.clear();
            for (s, t) in drawn.iter().enumerate() {
                tokens[s * len + pos] = t.id;
                if Some(t.id) == stop_at && lengths[s] == len {
                    lengths[s] = pos + 1;
                }
                fed.push(t.id);
            }
            // Every sequence has stopped: the rest is not part of any sample.
            if lengths.iter().all(|&l| l < len) {
                break;
            }
        }
        Ok(CausalGeneration {
            tokens,
            lengths,
            nfe,
        })
    }
}
