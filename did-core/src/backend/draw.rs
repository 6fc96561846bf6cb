//! Drawing tokens from logits (nucleus, then categorical): every backend's draw equals `draw_token`'s token for token.

use super::{MemoryOps, Slice};
use crate::sample::categorical::{draw_token, DrawScratch, SampledToken};
use crate::sample::nucleus::Nucleus;
use crate::sample::DrawSpec;

/// Tokens drawn from logits.
///
/// ```
/// use did_core::backend::{DrawOps, Slice};
/// use did_core::sample::{categorical::SampledToken, nucleus::Nucleus, DrawSpec};
/// /// Draws one token for each spec, from rows of `vocab` logits (`[MASK]` never drawn).
/// fn draw<B: DrawOps>(
///     be: &B, logits: Slice<'_, B::Buffer>, vocab: usize, mask_id: u32, nucleus: &Nucleus,
///     draws: &[DrawSpec], out: &mut [SampledToken],
/// ) -> Result<(), B::Error> {
///     be.draw_tokens(logits, vocab, mask_id, nucleus, draws, out)
/// }
/// ```
pub trait DrawOps: MemoryOps {
    /// Draws one token per logits row: SUBS softmax (no `[MASK]`), nucleus,
    /// f64 Gumbel-max from `draws[r]`, with the three confidences. Must agree
    /// token for token with [`draw_token`] on the same logits, confidences
    /// within 1e-12 relative (sums in another order). The provided version
    /// downloads the logits and calls it; a GPU backend overrides it.
    fn draw_tokens(
        &self,
        logits: Slice<'_, Self::Buffer>,
        vocab: usize,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        out: &mut [SampledToken],
    ) -> Result<(), Self::Error> {
        let mut row = alloc::vec![0.0f32; vocab];
        let mut scratch = DrawScratch::default();
        for (r, (spec, slot)) in draws.iter().zip(out.iter_mut()).enumerate() {
            self.download(Slice::at(logits.buf, logits.offset + r * vocab), &mut row)?;
            *slot = draw_token(&row, mask_id, nucleus, &spec.stream, spec.row, &mut scratch);
        }
        Ok(())
    }
}
