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
    /// ([`FusedOps::residual_forward_into`] with a [`ResidualBranch`] without dropout): a
    /// branch's projection into the residual stream, for a pass without dropout.
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

/// A residual branch's output as it joins the residual stream, for
/// [`FusedOps::residual_forward_into`] and [`FusedOps::residual_backward`]:
/// `out = residual + gate · dropout(y + bias)` over `[batch, tokens, channels]`.
///
/// ```
/// use did_core::backend::{ResidualBranch, Slice};
/// let gate = vec![0.5f32; 2 * 8];
/// // The attention branch of a block without dropout: gated, no bias.
/// let branch = ResidualBranch {
///     gate: Some(Slice::whole(&gate)),
///     ..ResidualBranch::<Vec<f32>>::plain(2, 16, 8)
/// };
/// assert!(branch.bias.is_none() && branch.dropout.is_none());
/// ```
#[derive(Debug)]
pub struct ResidualBranch<'a, T: ?Sized> {
    /// `[channels]`, added into `y` first; none: no bias.
    pub bias: Option<Slice<'a, T>>,
    /// The branch's dropout on `y` after the bias (training); none: no dropout.
    pub dropout: Option<DropoutMask>,
    /// `[batch, channels]`, one gate a sequence; none: a gate of 1.
    pub gate: Option<Slice<'a, T>>,
    /// Sequences.
    pub batch: usize,
    /// Rows a sequence.
    pub tokens: usize,
    /// Channels a row.
    pub channels: usize,
}

impl<T: ?Sized> ResidualBranch<'_, T> {
    /// `out = residual + y`: no bias, no dropout, no gate.
    pub fn plain(batch: usize, tokens: usize, channels: usize) -> Self {
        ResidualBranch {
            bias: None,
            dropout: None,
            gate: None,
            batch,
            tokens,
            channels,
        }
    }
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
            let branch = ResidualBranch {
                bias,
                dropout: None,
                gate,
                batch: rows / tokens,
                tokens,
                channels: d_out,
            };
            be.residual_forward_into(residual, SliceMut::at(buf, offset), branch, out)
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
    /// A branch's output joining the residual stream: `y += bias`, then `y = dropout(y)`, then
    /// `out = residual + gate·y`, each step where `branch` has it (`y` keeps the biased, dropped
    /// values for the backward; it is only read without a bias or a dropout). The provided version
    /// calls [`LinearOps::bias_add`](crate::backend::LinearOps::bias_add),
    /// [`ActivationOps::dropout`](crate::backend::ActivationOps::dropout), [`MemoryOps::copy`](crate::backend::MemoryOps::copy)
    /// and [`ActivationOps::gated_residual_forward`](crate::backend::ActivationOps::gated_residual_forward);
    /// a backend may do them in one pass.
    fn residual_forward_into(
        &self,
        residual: Slice<'_, Self::Buffer>,
        y: SliceMut<'_, Self::Buffer>,
        branch: ResidualBranch<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error> {
        let ResidualBranch {
            bias,
            dropout,
            gate,
            batch,
            tokens,
            channels,
        } = branch;
        let SliceMut { buf, offset } = y;
        let n = batch * tokens * channels;
        if let Some(b) = bias {
            self.bias_add(SliceMut::at(&mut *buf, offset), b, batch * tokens, channels)?;
        }
        if let Some(d) = dropout {
            self.dropout(SliceMut::at(&mut *buf, offset), n, d.p, &d.stream)?;
        }
        let SliceMut {
            buf: out,
            offset: out_offset,
        } = out;
        self.copy(residual, SliceMut::at(&mut *out, out_offset), n)?;
        self.gated_residual_forward(
            SliceMut::at(out, out_offset),
            Slice::at(&*buf, offset),
            gate,
            batch,
            tokens,
            channels,
        )
    }
    /// The backward of [`FusedOps::residual_forward_into`] down to the branch's output:
    /// [`ActivationOps::gated_residual_backward`](crate::backend::ActivationOps::gated_residual_backward)
    /// (`dy = gate·dresidual`, `dgate += Σ dresidual·y`), then the branch's dropout on `dy` (the
    /// forward's mask) where it has one. The bias's gradient is `bias_backward` of `dy`, so
    /// `branch.bias` is not read. The provided version makes the calls; a backend may do them in
    /// one pass.
    fn residual_backward(
        &self,
        dresidual: Slice<'_, Self::Buffer>,
        y: Slice<'_, Self::Buffer>,
        branch: ResidualBranch<'_, Self::Buffer>,
        dy: SliceMut<'_, Self::Buffer>,
        dgate: Option<SliceMut<'_, Self::Buffer>>,
    ) -> Result<(), Self::Error> {
        let ResidualBranch {
            dropout,
            gate,
            batch,
            tokens,
            channels,
            ..
        } = branch;
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
        match dropout {
            Some(d) => {
                let n = batch * tokens * channels;
                self.dropout(SliceMut::at(buf, offset), n, d.p, &d.stream)
            }
            None => Ok(()),
        }
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
