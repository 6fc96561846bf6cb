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
//!    KV cache (bd3lm.md §4.2).
//!
//! A request may also span several blocks from position 0 (post-hoc scoring
//! of a finished sequence); it then comes right after `begin_stage`.
//!
//! Logits are raw network outputs (`vocab_size` per output, row-major, in the
//! order of `outputs`), including at the `[MASK]` id and at positions whose
//! input is not masked: the sampler applies SUBS itself.

use core::fmt;
use core::ops::Range;

use crate::mask::AttentionMask;

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
}
