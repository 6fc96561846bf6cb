//! Ops that are compositions of other families' ops, provided as their steps.
//!
//! A backend overrides one where a single kernel does the work: CUDA's few-rows linear with its
//! epilogue, LayerNorm with the adaLN modulation, bias + dropout + gated residual in one pass.

use super::{
    ActivationOps, AttentionOps, DropoutMask, Gemm, LinearOps, NormOps, NormShape, RopeShape,
    RowGroups, Slice, SliceMut,
};

/// What consumes a linear forward's output `y = x·Wᵀ` next in a block, for
/// [`FusedOps::linear_forward_then`]: a backend may compute both in one pass (on CUDA, the
/// few-rows kernel of a batch-1 draft call does), with the results of the two calls.
///
/// ```
/// use did_core::backend::{LinearThen, Slice, SliceMut};
/// let (bias, mut gelu) = (vec![0.5f32; 3], vec![0.0f32; 6]);
/// // The MLP's up-projection: y += bias, then gelu = gelu_tanh(y).
/// let then = LinearThen::BiasGelu { bias: Slice::whole(&bias), gelu: SliceMut::whole(&mut gelu) };
/// assert!(matches!(then, LinearThen::BiasGelu { .. }));
/// ```
#[derive(Debug)]
pub enum LinearThen<'a, T: ?Sized> {
    /// [`FusedOps::bias_gelu_forward`] on `y`: `y += bias` (kept for the backward), then
    /// `gelu = gelu_tanh(y)`.
    BiasGelu {
        /// `[d_out]`.
        bias: Slice<'a, T>,
        /// `[rows, d_out]`.
        gelu: SliceMut<'a, T>,
    },
    /// `y += bias` where there is one, then `out = residual + gate·y`
    /// ([`FusedOps::bias_gated_residual_forward_into`], or
    /// [`FusedOps::gated_residual_forward_into`] without a bias): a branch's projection into the
    /// residual stream, for a pass without dropout.
    GatedResidual {
        /// `[d_out]` or none.
        bias: Option<Slice<'a, T>>,
        /// `[rows / tokens, d_out]`, one gate a sequence, or none (a gate of 1).
        gate: Option<Slice<'a, T>>,
        /// `[rows, d_out]`.
        residual: Slice<'a, T>,
        /// `[rows, d_out]`.
        out: SliceMut<'a, T>,
        /// Rows a sequence (a divisor of the rows).
        tokens: usize,
    },
}

/// [`FusedOps::linear_forward_then`] as its two calls: [`LinearOps::matmul`](crate::backend::LinearOps::matmul), then the op `then`
/// names. The trait's provided version, and a backend's own where it does not fuse a shape.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward_then_in_steps<B: FusedOps + ?Sized>(
    be: &B,
    x: Slice<'_, B::Buffer>,
    w: Slice<'_, B::Buffer>,
    y: SliceMut<'_, B::Buffer>,
    rows: usize,
    d_in: usize,
    d_out: usize,
    then: LinearThen<'_, B::Buffer>,
) -> Result<(), B::Error> {
    let SliceMut { buf, offset } = y;
    be.matmul(
        &Gemm::linear(rows, d_in, d_out),
        x,
        w,
        SliceMut::at(&mut *buf, offset),
    )?;
    match then {
        LinearThen::BiasGelu { bias, gelu } => {
            be.bias_gelu_forward(SliceMut::at(buf, offset), bias, gelu, rows, d_out)
        }
        LinearThen::GatedResidual {
            bias,
            gate,
            residual,
            out,
            tokens,
        } => {
            let tokens = tokens.max(1);
            let batch = rows / tokens;
            match bias {
                Some(b) => be.bias_gated_residual_forward_into(
                    residual,
                    SliceMut::at(buf, offset),
                    b,
                    gate,
                    out,
                    batch,
                    tokens,
                    d_out,
                ),
                None => be.gated_residual_forward_into(
                    residual,
                    Slice::at(&*buf, offset),
                    gate,
                    out,
                    batch,
                    tokens,
                    d_out,
                ),
            }
        }
    }
}

/// Composites of the other families' ops; a backend overrides those it fuses.
///
/// ```
/// use did_core::backend::{FusedOps, LinearThen, Slice, SliceMut};
/// /// The MLP's up-projection and its GELU, fused where the backend can.
/// fn up<B: FusedOps>(
///     be: &B, x: Slice<'_, B::Buffer>, w: Slice<'_, B::Buffer>, b: Slice<'_, B::Buffer>,
///     y: SliceMut<'_, B::Buffer>, gelu: SliceMut<'_, B::Buffer>, rows: usize, d_in: usize, d_out: usize,
/// ) -> Result<(), B::Error> {
///     be.linear_forward_then(x, w, y, rows, d_in, d_out, LinearThen::BiasGelu { bias: b, gelu })
/// }
/// ```
pub trait FusedOps: LinearOps + NormOps + AttentionOps + ActivationOps {
    /// A linear forward `y[rows, d_out] = x[rows, d_in]·Wᵀ` (`W` stored `[d_out, d_in]`, every
    /// matrix dense) and the op that consumes `y` ([`LinearThen`]), with the results of the two
    /// calls. Provided: [`linear_forward_then_in_steps`]; a backend may fuse them.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward_then(
        &self,
        x: Slice<'_, Self::Buffer>,
        w: Slice<'_, Self::Buffer>,
        y: SliceMut<'_, Self::Buffer>,
        rows: usize,
        d_in: usize,
        d_out: usize,
        then: LinearThen<'_, Self::Buffer>,
    ) -> Result<(), Self::Error> {
        linear_forward_then_in_steps(self, x, w, y, rows, d_in, d_out, then)
    }
    /// LayerNorm, then adaLN modulation of its output (the DiT's pre-norm), in one call:
    /// `ln_out`, `mean`, `rstd` as [`NormOps::layernorm_forward`](crate::backend::NormOps::layernorm_forward) writes them (the backward
    /// needs them) and `out` as [`NormOps::modulate_forward`](crate::backend::NormOps::modulate_forward) writes it from `ln_out`, with
    /// `tokens` rows per sequence (`shape.rows / tokens` sequences). The provided version calls
    /// the two; a backend may fuse them (one pass over the rows, one launch fewer).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_modulate_forward(
        &self,
        shape: &NormShape,
        x: Slice<'_, Self::Buffer>,
        weight: Slice<'_, Self::Buffer>,
        bias: Option<Slice<'_, Self::Buffer>>,
        shift: Slice<'_, Self::Buffer>,
        scale: Slice<'_, Self::Buffer>,
        tokens: usize,
        ln_out: SliceMut<'_, Self::Buffer>,
        mean: SliceMut<'_, Self::Buffer>,
        rstd: SliceMut<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = ln_out;
        self.layernorm_forward(
            shape,
            x,
            weight,
            bias,
            SliceMut::at(&mut *buf, offset),
            mean,
            rstd,
        )?;
        let batch = shape.rows.checked_div(tokens).unwrap_or(0);
        self.modulate_forward(
            Slice::at(&*buf, offset),
            shift,
            scale,
            out,
            batch,
            tokens,
            shape.cols,
        )
    }
    /// Gated residual out of place: `out = residual + gate·y`, as
    /// [`ActivationOps::gated_residual_forward`](crate::backend::ActivationOps::gated_residual_forward) on a copy of `residual`. The provided version copies
    /// and calls it; a backend may fuse them.
    #[allow(clippy::too_many_arguments)]
    fn gated_residual_forward_into(
        &self,
        residual: Slice<'_, Self::Buffer>,
        y: Slice<'_, Self::Buffer>,
        gate: Option<Slice<'_, Self::Buffer>>,
        out: SliceMut<'_, Self::Buffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = out;
        let n = batch * tokens * channels;
        self.copy(residual, SliceMut::at(&mut *buf, offset), n)?;
        self.gated_residual_forward(SliceMut::at(buf, offset), y, gate, batch, tokens, channels)
    }
    /// `y[t, c] += bias[c]`, then `out = residual + gate·y`: a linear layer's bias and the gated
    /// residual it feeds, for a pass without dropout between them (`y` keeps the biased values
    /// for the backward). The provided version calls [`LinearOps::bias_add`](crate::backend::LinearOps::bias_add) and
    /// [`FusedOps::gated_residual_forward_into`]; a backend may fuse them.
    #[allow(clippy::too_many_arguments)]
    fn bias_gated_residual_forward_into(
        &self,
        residual: Slice<'_, Self::Buffer>,
        y: SliceMut<'_, Self::Buffer>,
        bias: Slice<'_, Self::Buffer>,
        gate: Option<Slice<'_, Self::Buffer>>,
        out: SliceMut<'_, Self::Buffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = y;
        self.bias_add(
            SliceMut::at(&mut *buf, offset),
            bias,
            batch * tokens,
            channels,
        )?;
        self.gated_residual_forward_into(
            residual,
            Slice::at(&*buf, offset),
            gate,
            out,
            batch,
            tokens,
            channels,
        )
    }
    /// `y = dropout(y + bias)` (`bias` optional), then `out = residual + gate·y`: a training
    /// pass's branch output — its bias, its dropout and the gated residual it feeds — with `y`
    /// keeping the dropped values for the backward. The provided version calls
    /// [`LinearOps::bias_add`](crate::backend::LinearOps::bias_add), [`ActivationOps::dropout`](crate::backend::ActivationOps::dropout) and [`FusedOps::gated_residual_forward_into`];
    /// a backend may do them in one pass.
    #[allow(clippy::too_many_arguments)]
    fn bias_dropout_gated_residual_forward_into(
        &self,
        residual: Slice<'_, Self::Buffer>,
        y: SliceMut<'_, Self::Buffer>,
        bias: Option<Slice<'_, Self::Buffer>>,
        dropout: DropoutMask,
        gate: Option<Slice<'_, Self::Buffer>>,
        out: SliceMut<'_, Self::Buffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = y;
        let n = batch * tokens * channels;
        if let Some(b) = bias {
            self.bias_add(SliceMut::at(&mut *buf, offset), b, batch * tokens, channels)?;
        }
        self.dropout(
            SliceMut::at(&mut *buf, offset),
            n,
            dropout.p,
            &dropout.stream,
        )?;
        self.gated_residual_forward_into(
            residual,
            Slice::at(&*buf, offset),
            gate,
            out,
            batch,
            tokens,
            channels,
        )
    }
    /// [`ActivationOps::gated_residual_backward`](crate::backend::ActivationOps::gated_residual_backward), then the branch's dropout backward on `dy` (the
    /// forward's mask, [`ActivationOps::dropout`](crate::backend::ActivationOps::dropout) on the gradient). The provided version makes the
    /// two calls; a backend may do both in one pass.
    #[allow(clippy::too_many_arguments)]
    fn gated_residual_backward_dropout(
        &self,
        dresidual: Slice<'_, Self::Buffer>,
        y: Slice<'_, Self::Buffer>,
        gate: Option<Slice<'_, Self::Buffer>>,
        dy: SliceMut<'_, Self::Buffer>,
        dgate: Option<SliceMut<'_, Self::Buffer>>,
        dropout: DropoutMask,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = dy;
        self.gated_residual_backward(
            dresidual,
            y,
            gate,
            SliceMut::at(&mut *buf, offset),
            dgate,
            batch,
            tokens,
            channels,
        )?;
        let n = batch * tokens * channels;
        self.dropout(SliceMut::at(buf, offset), n, dropout.p, &dropout.stream)
    }
    /// [`AttentionOps::rope_forward`](crate::backend::AttentionOps::rope_forward) on `x`, then [`MemoryOps::copy_row_groups`](crate::backend::MemoryOps::copy_row_groups) from `copy_from`
    /// elements past `x`'s offset into `dst`: a KV-cached pass's RoPE over its queries and keys
    /// followed by the append of its rotated keys and its values to the cache, which the provided
    /// version does as those two calls; a backend may do both in one pass.
    fn rope_forward_and_copy(
        &self,
        shape: &RopeShape,
        x: SliceMut<'_, Self::Buffer>,
        copy_from: usize,
        dst: SliceMut<'_, Self::Buffer>,
        layout: &RowGroups,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = x;
        self.rope_forward(shape, SliceMut::at(&mut *buf, offset))?;
        self.copy_row_groups(Slice::at(&*buf, offset + copy_from), dst, layout)
    }
    /// `x[rows, cols] += bias[cols]`, then `out = gelu_tanh(x)`: the MLP's first activation
    /// (`x` keeps the pre-activation for the backward). The provided version calls
    /// [`LinearOps::bias_add`](crate::backend::LinearOps::bias_add) and [`ActivationOps::gelu_forward`](crate::backend::ActivationOps::gelu_forward); a backend may fuse them.
    fn bias_gelu_forward(
        &self,
        x: SliceMut<'_, Self::Buffer>,
        bias: Slice<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
        rows: usize,
        cols: usize,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = x;
        self.bias_add(SliceMut::at(&mut *buf, offset), bias, rows, cols)?;
        self.gelu_forward(Slice::at(&*buf, offset), out, rows * cols)
    }
}
