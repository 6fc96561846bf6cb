//! LayerNorm and adaLN modulation, each forward beside its backward.

use super::{MemoryOps, Slice, SliceMut};

/// The shape of a LayerNorm over the last dimension.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormShape {
    /// Rows normalised independently.
    pub rows: usize,
    /// Channels per row.
    pub cols: usize,
    /// Added to the variance (1e-5 for the DiT).
    pub eps: f32,
}

/// LayerNorm and the adaLN modulation.
///
/// ```
/// use did_core::backend::{NormOps, NormShape, Slice, SliceMut};
/// /// DiT's weight-only LayerNorm over `rows` rows of `cols` channels.
/// fn norm<B: NormOps>(
///     be: &B, shape: &NormShape, x: Slice<'_, B::Buffer>, w: Slice<'_, B::Buffer>,
///     out: SliceMut<'_, B::Buffer>, mean: SliceMut<'_, B::Buffer>, rstd: SliceMut<'_, B::Buffer>,
/// ) -> Result<(), B::Error> {
///     be.layernorm_forward(shape, x, w, None, out, mean, rstd)
/// }
/// ```
pub trait NormOps: MemoryOps {
    /// LayerNorm over the last dimension: `out = (x − μ)·rstd·w (+ b)`; saves `mean` and `rstd` per row.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        shape: &NormShape,
        x: Slice<'_, Self::Buffer>,
        weight: Slice<'_, Self::Buffer>,
        bias: Option<Slice<'_, Self::Buffer>>,
        out: SliceMut<'_, Self::Buffer>,
        mean: SliceMut<'_, Self::Buffer>,
        rstd: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
    /// Accumulates `dx` and `dweight` from `dout`. A LayerNorm bias gets
    /// `Σ_rows dout` from [`LinearOps::bias_backward`](crate::backend::LinearOps::bias_backward) (gradients of one layer
    /// usually share a buffer, so each op writes one of them).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        shape: &NormShape,
        dout: Slice<'_, Self::Buffer>,
        x: Slice<'_, Self::Buffer>,
        weight: Slice<'_, Self::Buffer>,
        mean: Slice<'_, Self::Buffer>,
        rstd: Slice<'_, Self::Buffer>,
        dx: SliceMut<'_, Self::Buffer>,
        dweight: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
    /// adaLN modulation: `out[b, t, c] = x·(1 + scale[b, c]) + shift[b, c]`
    /// (`scale`, `shift` of one sequence shared by its `tokens`). Out of place,
    /// because the backward needs `x` (a backend may fuse it with the LayerNorm).
    #[allow(clippy::too_many_arguments)]
    fn modulate_forward(
        &self,
        x: Slice<'_, Self::Buffer>,
        shift: Slice<'_, Self::Buffer>,
        scale: Slice<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), Self::Error>;
    /// Given `dout` and the *un*modulated input `x`: writes
    /// `dx = dout·(1 + scale)` and accumulates `dscale[b, c] += Σ_t dout·x`. The shift
    /// gradient is `Σ_t dout`: [`LinearOps::bias_backward`](crate::backend::LinearOps::bias_backward) over each sequence.
    #[allow(clippy::too_many_arguments)]
    fn modulate_backward(
        &self,
        dout: Slice<'_, Self::Buffer>,
        x: Slice<'_, Self::Buffer>,
        scale: Slice<'_, Self::Buffer>,
        dx: SliceMut<'_, Self::Buffer>,
        dscale: SliceMut<'_, Self::Buffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), Self::Error>;
}
