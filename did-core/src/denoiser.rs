//! What the sampler needs from a model: the [`Denoiser`] contract.
//!
//! A denoiser maps a batch of partly masked sequences to raw logits at the
//! positions the sampler asks for. It does not sample, apply SUBS, or keep
//! any randomness: the driver in [`crate::refine`] does all of that, so any
//! engine that implements this trait gets the same draft, remask and refine.
//!
//! # The contract
//!
//! A stage of generation runs with one attention block size `B`:
//!
//! 1. [`Denoiser::begin_stage`] — forget any cache; sequences have length `L`.
//! 2. For each block `[s, s + B)`, left to right, zero or more
//!    [`Denoiser::logits`] calls, each with `request.block = s..s+B`. The
//!    model runs over `tokens[.., ..block.end]` with the mask
//!    [`DenoiseRequest::attention`]: block-causal with block size `B`, so a
//!    position sees its own block and all earlier ones, never later ones.
//!    Logits are wanted only at `request.outputs` (all inside the block).
//! 3. [`Denoiser::commit_block`] once the block is final (for every block but
//!    the last of the stage). Tokens before `block.start` never change again in
//!    the stage, so their keys and values may be cached: that is BD3-LM's exact
//!    KV cache (docs/bd3lm.md §4.2).
//!
//! A request may also span several blocks from position 0 (post-hoc scoring
//! of a finished sequence); it then comes right after `begin_stage`.
//!
//! Logits are raw network outputs (`vocab_size` per output, row-major, in the
//! order of `outputs`), including at the `[MASK]` id and at positions whose
//! input is not masked: the sampler applies SUBS itself.
//!
//! The sampler asks for tokens through [`Denoiser::draw`]: its provided version
//! takes [`Denoiser::logits`] and draws each row with [`draw_token`], and a
//! denoiser whose logits live on a device may override it to draw there (and
//! move a token a row instead of a row of logits), as long as the tokens are
//! those `draw_token` would draw.

use core::fmt;
use core::ops::Range;

use alloc::vec::Vec;

use crate::mask::AttentionMask;
use crate::sample::categorical::{draw_token, DrawScratch, SampledToken};
use crate::sample::nucleus::Nucleus;
use crate::sample::DrawSpec;

/// A position at which logits are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutputPosition {
    /// The sequence in the batch.
    pub seq: u32,
    /// The position in the sequence.
    pub pos: u32,
}

/// One call of the denoiser.
#[derive(Debug, Clone)]
pub struct DenoiseRequest<'a> {
    /// `[batch, seq_len]` token ids; masked positions hold the mask id.
    pub tokens: &'a [u32],
    /// How many sequences.
    pub batch: usize,
    /// Their length `L`.
    pub seq_len: usize,
    /// The attention block size of this stage (`L` for full attention).
    pub block_size: usize,
    /// The positions being generated; queries are computed for these only.
    pub block: Range<usize>,
    /// Where logits are wanted.
    pub outputs: &'a [OutputPosition],
}

impl<'a> DenoiseRequest<'a> {
    /// The tokens of sequence `seq`.
    pub fn sequence(&self, seq: usize) -> &'a [u32] {
        &self.tokens[seq * self.seq_len..(seq + 1) * self.seq_len]
    }

    /// The attention mask of the request: queries are `block`, keys `0..block.end`.
    ///
    /// ```
    /// use did_core::denoiser::DenoiseRequest;
    /// let r = DenoiseRequest { tokens: &[0; 8], batch: 1, seq_len: 8, block_size: 4, block: 4..8, outputs: &[] };
    /// assert!(r.attention().allows(0, 7)); // query 0 is position 4
    /// assert!(r.attention().allows(0, 0));
    /// ```
    pub fn attention(&self) -> AttentionMask {
        AttentionMask::BlockCausal {
            block_size: self.block_size,
            query_offset: self.block.start,
            key_offset: 0,
            window: None,
        }
    }
}

/// A model the sampler can drive. See the module docs for the contract.
///
/// The example `cargo run -p did-core --example toy_denoiser` implements it
/// with a bigram table in under a hundred lines.
pub trait Denoiser {
    /// The model's error.
    type Error: fmt::Debug + fmt::Display;

    /// Size of a logits row (including the mask id).
    fn vocab_size(&self) -> usize;

    /// The `[MASK]` token id.
    fn mask_id(&self) -> u32;

    /// Starts a stage: drop every cached key and value.
    fn begin_stage(
        &mut self,
        batch: usize,
        seq_len: usize,
        block_size: usize,
    ) -> Result<(), Self::Error> {
        let _ = (batch, seq_len, block_size);
        Ok(())
    }

    /// Writes raw logits for `request.outputs` into `out` (`outputs.len() × vocab_size`).
    fn logits(&mut self, request: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error>;

    /// The block `request.block` is final: cache what later blocks need.
    fn commit_block(&mut self, request: &DenoiseRequest<'_>) -> Result<(), Self::Error> {
        let _ = request;
        Ok(())
    }

    /// Draws one token at each of `request.outputs` (into `out`, in order) from its logits:
    /// what [`draw_token`] draws with `mask_id`, `nucleus` and the stream and row of
    /// `draws[i]`. The provided version computes [`Denoiser::logits`] into `scratch` and draws
    /// on the host; override it only to draw where the logits are, with the same tokens.
    ///
    /// ```
    /// use did_core::sample::DrawSpec;
    /// use did_core::denoiser::{DenoiseRequest, Denoiser, HostDrawScratch, OutputPosition};
    /// use did_core::rng::{Purpose, RngStream};
    /// use did_core::sample::{Confidence, Nucleus, SampledToken};
    /// struct Sure; // always the logits of token 2
    /// impl Denoiser for Sure {
    ///     type Error = core::convert::Infallible;
    ///     fn vocab_size(&self) -> usize { 4 }
    ///     fn mask_id(&self) -> u32 { 3 }
    ///     fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
    ///         for row in out.chunks_mut(4) { row.copy_from_slice(&[0.0, 0.0, 50.0, 0.0]); }
    ///         Ok(())
    ///     }
    /// }
    /// let outputs = [OutputPosition { seq: 0, pos: 1 }];
    /// let r = DenoiseRequest { tokens: &[0, 3], batch: 1, seq_len: 2, block_size: 2, block: 0..2, outputs: &outputs };
    /// let draws = [DrawSpec { stream: RngStream::new(1, Purpose::Categorical, 0, 0), row: 1 }];
    /// let mut out = [SampledToken { id: 0, confidence: Confidence::PINNED }];
    /// Sure.draw(&r, 3, &Nucleus::default(), &draws, &mut HostDrawScratch::default(), &mut out)?;
    /// assert_eq!(out[0].id, 2);
    /// # Ok::<(), core::convert::Infallible>(())
    /// ```
    fn draw(
        &mut self,
        request: &DenoiseRequest<'_>,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        scratch: &mut HostDrawScratch,
        out: &mut [SampledToken],
    ) -> Result<(), Self::Error> {
        let vocab = self.vocab_size();
        scratch.logits.clear();
        scratch.logits.resize(request.outputs.len() * vocab, 0.0);
        self.logits(request, &mut scratch.logits)?;
        for ((row, spec), slot) in scratch.logits.chunks(vocab).zip(draws).zip(out) {
            *slot = draw_token(
                row,
                mask_id,
                nucleus,
                &spec.stream,
                spec.row,
                &mut scratch.draw,
            );
        }
        Ok(())
    }
}

/// The buffers [`Denoiser::draw`]'s provided version reuses from call to call.
#[derive(Debug, Default, Clone)]
pub struct HostDrawScratch {
    logits: Vec<f32>,
    draw: DrawScratch,
}

impl<D: Denoiser + ?Sized> Denoiser for &mut D {
    type Error = D::Error;
    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }
    fn mask_id(&self) -> u32 {
        (**self).mask_id()
    }
    fn begin_stage(
        &mut self,
        batch: usize,
        seq_len: usize,
        block_size: usize,
    ) -> Result<(), Self::Error> {
        (**self).begin_stage(batch, seq_len, block_size)
    }
    fn logits(&mut self, request: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
        (**self).logits(request, out)
    }
    fn commit_block(&mut self, request: &DenoiseRequest<'_>) -> Result<(), Self::Error> {
        (**self).commit_block(request)
    }
    fn draw(
        &mut self,
        request: &DenoiseRequest<'_>,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        scratch: &mut HostDrawScratch,
        out: &mut [SampledToken],
    ) -> Result<(), Self::Error> {
        (**self).draw(request, mask_id, nucleus, draws, scratch, out)
    }
}
