//! Activations, dropout and the gated residual: GELU (tanh), SiLU, dropout from an RNG stream, `residual += gate·y`.

use super::{MemoryOps, Slice, SliceMut};
use crate::rng::RngStream;

/// One tensor's inverted dropout: probability `p`, the mask drawn from `stream` as
/// [`ActivationOps::dropout`] draws it (element `i` kept iff `stream.uniform_f32(0, i) ≥ p`).
///
/// ```
/// use did_core::backend::DropoutMask;
/// use did_core::rng::{Purpose, RngStream};
/// let mask = DropoutMask { p: 0.1, stream: RngStream::new(7, Purpose::Dropout, 0, 3) };
/// assert_eq!(mask.keep_scale(), 1.0 / 0.9);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutMask {
    /// Probability of dropping an element.
    pub p: f32,
    /// Where the mask comes from.
    pub stream: RngStream,
}

impl DropoutMask {
    /// The factor kept elements get: `1/(1 − p)`, 0 when `p ≥ 1` (everything dropped).
    pub fn keep_scale(&self) -> f32 {
        if self.p < 1.0 {
            1.0 / (1.0 - self.p)
        } else {
            0.0
        }
    }
}

/// Activations, dropout and the gated residual.
///
/// ```
/// use did_core::backend::{ActivationOps, Slice, SliceMut};
/// fn gelu<B: ActivationOps>(be: &B, x: Slice<'_, B::Buffer>, out: SliceMut<'_, B::Buffer>, n: usize) -> Result<(), B::Error> {
///     be.gelu_forward(x, out, n)
/// }
/// ```
pub trait ActivationOps: MemoryOps {
    /// Gated residual: `residual[b, t, c] += gate[b, c] · y[b, t, c]` (`gate = None` means 1).
    #[allow(clippy::too_many_arguments)]
    fn gated_residual_forward(
        &self,
        residual: SliceMut<'_, Self::Buffer>,
        y: Slice<'_, Self::Buffer>,
        gate: Option<Slice<'_, Self::Buffer>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), Self::Error>;
    /// Writes `dy = gate·dresidual` and accumulates `dgate += Σ_t dresidual·y`.
    #[allow(clippy::too_many_arguments)]
    fn gated_residual_backward(
        &self,
        dresidual: Slice<'_, Self::Buffer>,
        y: Slice<'_, Self::Buffer>,
        gate: Option<Slice<'_, Self::Buffer>>,
        dy: SliceMut<'_, Self::Buffer>,
        dgate: Option<SliceMut<'_, Self::Buffer>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), Self::Error>;
    /// `out = gelu_tanh(x)` over `len` elements.
    fn gelu_forward(
        &self,
        x: Slice<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// `dx = dout · gelu_tanh'(x)` (written, not accumulated).
    fn gelu_backward(
        &self,
        dout: Slice<'_, Self::Buffer>,
        x: Slice<'_, Self::Buffer>,
        dx: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// `out = x·sigmoid(x)` over `len` elements (the adaLN conditioning MLP when time conditioning is on).
    fn silu_forward(
        &self,
        x: Slice<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// `dx = dout · silu'(x)` (written, not accumulated).
    fn silu_backward(
        &self,
        dout: Slice<'_, Self::Buffer>,
        x: Slice<'_, Self::Buffer>,
        dx: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// Inverted dropout in place: element `i` is kept iff `stream.uniform_f32(0, i) ≥ p`,
    /// and kept elements are scaled by `1/(1 − p)`. The backward is the same call on the gradient.
    fn dropout(
        &self,
        x: SliceMut<'_, Self::Buffer>,
        len: usize,
        p: f32,
        stream: &RngStream,
    ) -> Result<(), Self::Error>;
}
