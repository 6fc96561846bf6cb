//! Several [`DiffusionDenoiser`]s' block calls (and block commits) as one model call: a server runs requests that
//! started at different times, so their drafts stand at different blocks, each over its own KV
//! cache. One pass serves them all — the embedding, every linear layer and the head over every
//! request's rows at once, RoPE and attention request by request over its own cache — and each
//! request gets what its own call would give: attention is the same call on the same cache, and
//! a row of a linear layer does not depend on the other rows.

use alloc::vec::Vec;

use super::denoiser::DiffusionDenoiser;
use super::kv_cache::KvCache;
use super::pass::{CacheUse, PassGroup, PassOutput};
use crate::backend::Backend;
use crate::denoiser::DenoiseRequest;
use crate::error::invalid;
use crate::model::ModelError;
use crate::sample::categorical::SampledToken;
use crate::sample::nucleus::Nucleus;
use crate::sample::DrawSpec;

/// One denoiser's part of a joint call: the request it would make alone.
pub struct JointRequest<'m, 'r, 'a, B: Backend> {
    /// The denoiser whose KV cache the request reads.
    pub denoiser: &'m mut DiffusionDenoiser<'a, B>,
    /// Its request: one block of its stage, which its cache serves.
    pub request: DenoiseRequest<'r>,
}

impl<'a, B: Backend> DiffusionDenoiser<'a, B> {
    /// [`Denoiser::logits`](crate::denoiser::Denoiser::logits) of every member's request in one
    /// model call run by `self` (its own cache is not used); `out` holds each member's rows in
    /// turn. Each member's logits are those of its own call. Members share the model and
    /// weights, the stage's block size and the block length; each block must be one that its
    /// cache serves (a whole block of its stage, aligned).
    ///
    /// `did-backend-cpu/tests/model.rs` runs it against each member alone.
    pub fn logits_together(
        &mut self,
        members: &mut [JointRequest<'_, '_, 'a, B>],
        out: &mut [f32],
    ) -> Result<(), ModelError<B::Error>> {
        let vocab = self.inference.model().config().vocab_size;
        let wanted: usize = members.iter().map(|m| m.request.outputs.len()).sum();
        if out.len() < wanted * vocab {
            return Err(invalid("logits buffer", "shorter than outputs × vocabulary").into());
        }
        self.run_together(members, CacheUse::Read, PassOutput::Logits(out))
    }

    /// [`Denoiser::draw`](crate::denoiser::Denoiser::draw) of every member's request in one model
    /// call, as [`Self::logits_together`]; `draws` and `out` hold each member's in turn.
    pub fn draw_together(
        &mut self,
        members: &mut [JointRequest<'_, '_, 'a, B>],
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        out: &mut [SampledToken],
    ) -> Result<(), ModelError<B::Error>> {
        let n: usize = members.iter().map(|m| m.request.outputs.len()).sum();
        if draws.len() < n || out.len() < n {
            return Err(invalid("draws", "fewer streams or slots than outputs").into());
        }
        self.run_together(
            members,
            CacheUse::Read,
            PassOutput::Tokens {
                mask_id,
                nucleus,
                draws: &draws[..n],
                out: &mut out[..n],
            },
        )
    }

    /// [`Denoiser::commit_block`](crate::denoiser::Denoiser::commit_block) of every member's
    /// request in one model call: each member's cache first catches up to its block's start on
    /// its own (usually nothing to do), then one pass stores every member's block. Members
    /// share what [`Self::logits_together`] asks; `self` runs the pass.
    pub fn commit_together(
        &mut self,
        members: &mut [JointRequest<'_, '_, 'a, B>],
    ) -> Result<(), ModelError<B::Error>> {
        self.run_together(members, CacheUse::Commit, PassOutput::Logits(&mut []))
    }

    /// Members fit one joint call: the same model, weights, stage block size and block length,
    /// each block one that its cache serves.
    fn check_members(
        &self,
        members: &[JointRequest<'_, '_, 'a, B>],
    ) -> Result<(), ModelError<B::Error>> {
        let Some(first) = members.first() else {
            return Ok(());
        };
        let (block_size, len) = (first.denoiser.block_size, first.request.block.len());
        for m in members {
            let (r, d) = (&m.request, &m.denoiser);
            let same_model = core::ptr::eq(d.inference.model(), self.inference.model())
                && core::ptr::eq(d.inference.params(), self.inference.params());
            let cached = d.use_cache
                && d.block_size == block_size
                && r.block.len() == len
                && len <= block_size
                && r.block.start % block_size == 0;
            if !same_model || !cached {
                return Err(invalid(
                    "joint call",
                    "members need the same model and weights, block size and block length, each a cached block of its stage",
                )
                .into());
            }
            d.inference.check_tokens(r.tokens, r.batch)?;
        }
        Ok(())
    }

    /// One pass of `tokens` (each member's block, in turn) with each member's cache as a group.
    fn pass_over_caches(
        &mut self,
        members: &mut [JointRequest<'_, '_, 'a, B>],
        tokens: &[u32],
        cache_use: CacheUse,
        outputs: &[(usize, usize)],
        out: PassOutput<'_>,
    ) -> Result<(), ModelError<B::Error>> {
        let Some(first) = members.first() else {
            return Ok(());
        };
        let block_size = first.denoiser.block_size;
        let mut caches: Vec<KvCache<B>> = Vec::with_capacity(members.len());
        for m in members.iter_mut() {
            match m.denoiser.cache.take() {
                Some(c) => caches.push(c),
                None => unreachable!("catch_up leaves a cache"),
            }
        }
        let mut groups: Vec<PassGroup<'_, B>> = members
            .iter()
            .zip(caches.iter_mut())
            .map(|(m, cache)| PassGroup {
                batch: m.request.batch,
                start: m.request.block.start,
                cache: Some(cache),
            })
            .collect();
        let ran =
            self.inference
                .pass_groups(tokens, block_size, &mut groups, cache_use, outputs, out);
        drop(groups);
        for (m, cache) in members.iter_mut().zip(caches) {
            m.denoiser.cache = Some(cache);
        }
        ran.map_err(ModelError::Backend)
    }

    /// Catches each member's cache up to its block, then one pass over every member's block:
    /// reading the caches and giving `out` at the requests' outputs, or storing the blocks.
    fn run_together(
        &mut self,
        members: &mut [JointRequest<'_, '_, 'a, B>],
        cache_use: CacheUse,
        out: PassOutput<'_>,
    ) -> Result<(), ModelError<B::Error>> {
        self.check_members(members)?;
        let mut tokens = Vec::new();
        let mut outputs = Vec::new();
        let mut first_seq = 0;
        for m in members.iter_mut() {
            let r = &m.request;
            m.denoiser.catch_up(r, r.block.start)?;
            for s in 0..r.batch {
                tokens.extend_from_slice(&r.sequence(s)[r.block.clone()]);
            }
            if cache_use == CacheUse::Read {
                outputs.extend(
                    r.outputs
                        .iter()
                        .map(|o| (first_seq + o.seq as usize, o.pos as usize - r.block.start)),
                );
            }
            first_seq += r.batch;
        }
        self.pass_over_caches(members, &tokens, cache_use, &outputs, out)
    }
}
