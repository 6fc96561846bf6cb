//! The DiT as the sampler's [`Denoiser`]: a block's denoising calls over the KV cache, and the
//! commit pass that stores a finished block's keys and values.

use alloc::vec::Vec;

use super::kv_cache::KvCache;
use super::pass::{CacheUse, Inference, PassOutput};
use crate::backend::Backend;
use crate::denoiser::{DenoiseRequest, Denoiser, HostDrawScratch};
use crate::error::invalid;
use crate::model::{Architecture, ModelError, Transformer};
use crate::sample::categorical::SampledToken;
use crate::sample::nucleus::Nucleus;
use crate::sample::DrawSpec;

/// The DiT as the sampler's [`Denoiser`], with an exact KV cache (or without, for checks).
///
/// A runnable draft → remask → refine with it is the example at the top of
/// the `did-backend-cpu` crate; the cached and uncached forms agree to
/// rounding (tested across the sliding window).
pub struct DiffusionDenoiser<'a, B: Backend> {
    pub(super) inference: Inference<'a, B>,
    pub(super) cache: Option<KvCache<B>>,
    pub(super) use_cache: bool,
    pub(super) block_size: usize,
    seq_len: usize,
    block_tokens: Vec<u32>,
    outputs: Vec<(usize, usize)>,
}

impl<'a, B: Backend> DiffusionDenoiser<'a, B> {
    /// A denoiser over `params`; `use_cache = false` recomputes the whole prefix at every call.
    pub fn new(
        be: &'a B,
        model: &'a Transformer,
        params: &'a B::Buffer,
        use_cache: bool,
    ) -> Result<Self, ModelError<B::Error>> {
        if model.config().architecture != Architecture::Dit {
            return Err(invalid(
                "model",
                "sampling by denoising needs a diffusion (DiT) model, not a causal one",
            )
            .into());
        }
        Ok(DiffusionDenoiser {
            inference: Inference::new(be, model, params).map_err(ModelError::Backend)?,
            cache: None,
            use_cache,
            block_size: 1,
            seq_len: 0,
            block_tokens: Vec::new(),
            outputs: Vec::new(),
        })
    }

    fn block_of(&mut self, request: &DenoiseRequest<'_>, range: core::ops::Range<usize>) {
        self.block_tokens.clear();
        for s in 0..request.batch {
            self.block_tokens
                .extend_from_slice(&request.sequence(s)[range.clone()]);
        }
    }

    /// One denoiser call: the cached pass over the block when it can, else the whole prefix.
    fn run(
        &mut self,
        request: &DenoiseRequest<'_>,
        out: PassOutput<'_>,
    ) -> Result<(), ModelError<B::Error>> {
        self.inference.check_tokens(request.tokens, request.batch)?;
        let block = request.block.clone();
        let single_block = block.len() <= self.block_size && block.start % self.block_size == 0;
        if self.use_cache && single_block {
            self.catch_up(request, block.start)?;
            self.block_of(request, block.clone());
            self.outputs.clear();
            self.outputs.extend(
                request
                    .outputs
                    .iter()
                    .map(|o| (o.seq as usize, o.pos as usize - block.start)),
            );
            let tokens = core::mem::take(&mut self.block_tokens);
            let outputs = core::mem::take(&mut self.outputs);
            let cache = self.cache.as_mut().map(|c| (c, CacheUse::Read));
            let r = self.inference.pass(
                &tokens,
                request.batch,
                block.start,
                self.block_size,
                cache,
                &outputs,
                out,
            );
            self.block_tokens = tokens;
            self.outputs = outputs;
            r.map_err(ModelError::Backend)
        } else {
            // Recompute the prefix: every position up to the end of the request.
            self.block_of(request, 0..block.end);
            self.outputs.clear();
            self.outputs.extend(
                request
                    .outputs
                    .iter()
                    .map(|o| (o.seq as usize, o.pos as usize)),
            );
            let tokens = core::mem::take(&mut self.block_tokens);
            let outputs = core::mem::take(&mut self.outputs);
            let r = self.inference.pass(
                &tokens,
                request.batch,
                0,
                self.block_size,
                None,
                &outputs,
                out,
            );
            self.block_tokens = tokens;
            self.outputs = outputs;
            r.map_err(ModelError::Backend)
        }
    }

    /// Commits blocks until the cache holds `[0, upto)`.
    pub(super) fn catch_up(
        &mut self,
        request: &DenoiseRequest<'_>,
        upto: usize,
    ) -> Result<(), ModelError<B::Error>> {
        let be = self.inference.be;
        let cfg = *self.inference.model.config();
        let need_new = match &self.cache {
            Some(c) => c.batch != request.batch || c.committed > upto,
            None => true,
        };
        if need_new {
            let capacity = self
                .seq_len
                .min(2 * cfg.context)
                .max(cfg.context.min(self.seq_len));
            self.cache =
                Some(KvCache::new(be, &cfg, request.batch, capacity).map_err(ModelError::Backend)?);
        }
        while let Some(from) = self
            .cache
            .as_ref()
            .map(|c| c.committed)
            .filter(|&c| c < upto)
        {
            let to = (from + self.block_size).min(upto);
            self.block_of(request, from..to);
            let tokens = core::mem::take(&mut self.block_tokens);
            let cache = self.cache.as_mut().map(|c| (c, CacheUse::Commit));
            let r = self.inference.pass(
                &tokens,
                request.batch,
                from,
                self.block_size,
                cache,
                &[],
                PassOutput::Logits(&mut []),
            );
            self.block_tokens = tokens;
            r.map_err(ModelError::Backend)?;
        }
        Ok(())
    }
}

impl<B: Backend> Denoiser for DiffusionDenoiser<'_, B> {
    type Error = ModelError<B::Error>;

    fn vocab_size(&self) -> usize {
        self.inference.model.config().vocab_size
    }

    fn mask_id(&self) -> u32 {
        self.inference.model.config().mask_id
    }

    fn begin_stage(
        &mut self,
        batch: usize,
        seq_len: usize,
        block_size: usize,
    ) -> Result<(), Self::Error> {
        let cfg = self.inference.model.config();
        if block_size > cfg.context {
            return Err(invalid(
                "block size",
                alloc::format!("a block of {block_size} exceeds the model's context of {}; refine with a block ≤ the context", cfg.context),
            )
            .into());
        }
        let _ = batch;
        self.block_size = block_size.max(1);
        self.seq_len = seq_len;
        if let Some(c) = self.cache.as_mut() {
            c.clear();
        }
        Ok(())
    }

    fn logits(&mut self, request: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
        if out.len() < request.outputs.len() * self.vocab_size() {
            return Err(invalid("logits buffer", "shorter than outputs × vocabulary").into());
        }
        self.run(request, PassOutput::Logits(out))
    }

    /// Draws with [`DrawOps::draw_tokens`](crate::backend::DrawOps::draw_tokens) from the logits where they are (a GPU
    /// backend moves a token a row, not the row).
    fn draw(
        &mut self,
        request: &DenoiseRequest<'_>,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        _scratch: &mut HostDrawScratch,
        out: &mut [SampledToken],
    ) -> Result<(), Self::Error> {
        let n = request.outputs.len();
        if draws.len() < n || out.len() < n {
            return Err(invalid("draws", "fewer streams or slots than outputs").into());
        }
        self.run(
            request,
            PassOutput::Tokens {
                mask_id,
                nucleus,
                draws: &draws[..n],
                out: &mut out[..n],
            },
        )
    }

    fn commit_block(&mut self, request: &DenoiseRequest<'_>) -> Result<(), Self::Error> {
        if self.use_cache && request.block.len() <= self.block_size {
            self.catch_up(request, request.block.end)?;
        }
        Ok(())
    }
}
