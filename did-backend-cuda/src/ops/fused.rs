//! [`FusedOps`]: the ops this backend runs as one kernel where did-core provides two or more
//! (the few-rows linear with its epilogue, LayerNorm with its modulation, bias + dropout + gated
//! residual, rope + the key/value copy).

use did_core::backend::prelude::*;
use did_core::backend::{
    Gemm, LinearThen, NormShape, ResidualBranch, RopeShape, RowGroups, Slice, SliceMut,
};

use crate::buffer::*;
use crate::device::*;
use crate::{few_rows, CudaError};

impl FusedOps for CudaBackend {
    fn layernorm_modulate_forward(
        &self,
        s: &NormShape,
        x: Slice<'_, CudaBuffer>,
        weight: Slice<'_, CudaBuffer>,
        bias: Option<Slice<'_, CudaBuffer>>,
        shift: Slice<'_, CudaBuffer>,
        scale: Slice<'_, CudaBuffer>,
        tokens: usize,
        ln_out: SliceMut<'_, CudaBuffer>,
        mean: SliceMut<'_, CudaBuffer>,
        rstd: SliceMut<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        if tokens == 0 || s.rows % tokens != 0 {
            return Err(CudaError::Shape(format!(
                "layernorm_modulate_forward: {} rows are not whole sequences of {tokens} tokens",
                s.rows
            )));
        }
        let sequences = s.rows / tokens;
        let modulation = [
            self.ptr(shift, sequences * s.cols, "modulate shift")?,
            self.ptr(scale, sequences * s.cols, "modulate scale")?,
            self.ptr_mut(out, s.rows * s.cols, "modulate out")?,
        ];
        self.layernorm(s, x, weight, bias, ln_out, mean, rstd, modulation, tokens)
    }
    fn linear_forward_then(
        &self,
        x: Slice<'_, CudaBuffer>,
        w: Slice<'_, CudaBuffer>,
        y: SliceMut<'_, CudaBuffer>,
        rows: usize,
        d_in: usize,
        d_out: usize,
        then: LinearThen<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        let g = Gemm::linear(rows, d_in, d_out);
        let fused = if self.few_rows_kernel() && rows > 0 && d_out > 0 {
            let (ea, eb, _) = g.extents();
            let (px, pw) = (self.ptr(x, ea, "linear x")?, self.ptr(w, eb, "linear w")?);
            let aligned = |p: u64| p % 16 == 0;
            let kind = match then {
                LinearThen::BiasGelu { .. } => few_rows::Then::BiasGelu,
                LinearThen::GatedResidual { .. } => few_rows::Then::GatedResidual,
            };
            few_rows::fused_kernel_for(&g, 8, aligned(px), aligned(pw), kind)
                .map(|kernel| (kernel, px, pw))
        } else {
            None
        };
        // A shape the fused kernels do not take: the two calls.
        let Some((kernel, px, pw)) = fused else {
            return did_core::backend::linear_forward_then_in_steps(
                self, x, w, y, rows, d_in, d_out, then,
            );
        };
        let n = rows * d_out;
        let py = self.ptr_mut(y, n, "linear y")?;
        let launch = self.grid((few_rows::blocks(d_out), 1, 1), few_rows::THREADS);
        let (rows_i32, d_in_i64, d_out_i64) = (rows as i32, d_in as i64, d_out as i64);
        match then {
            LinearThen::BiasGelu { bias, gelu } => {
                let bias = self.ptr(bias, d_out, "linear bias")?;
                let gelu = self.ptr_mut(gelu, n, "linear gelu")?;
                launch.linear_few_rows_bias_gelu(
                    kernel, px, d_in_i64, pw, d_in_i64, py, rows_i32, d_out_i64, d_in_i64, bias,
                    gelu,
                )
            }
            LinearThen::GatedResidual {
                bias,
                gate,
                residual,
                out,
                tokens,
            } => {
                let tokens = tokens.max(1);
                if rows % tokens != 0 {
                    return Err(CudaError::Shape(format!(
                        "linear_forward_then: {rows} rows are not whole sequences of {tokens}"
                    )));
                }
                let bias = match bias {
                    Some(b) => self.ptr(b, d_out, "linear bias")?,
                    None => 0,
                };
                let gate = self.gate_ptr(gate, rows / tokens, d_out)?;
                let residual = self.ptr(residual, n, "linear residual")?;
                let out = self.ptr_mut(out, n, "linear out")?;
                launch.linear_few_rows_gated_residual(
                    kernel,
                    px,
                    d_in_i64,
                    pw,
                    d_in_i64,
                    py,
                    rows_i32,
                    d_out_i64,
                    d_in_i64,
                    bias,
                    gate,
                    residual,
                    out,
                    tokens as i64,
                )
            }
        }
    }
    fn residual_forward_into(
        &self,
        residual: Slice<'_, CudaBuffer>,
        y: SliceMut<'_, CudaBuffer>,
        branch: ResidualBranch<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        let ResidualBranch {
            bias,
            dropout,
            gate,
            batch,
            tokens,
            channels,
        } = branch;
        // One pass: the kernel writes y only with a bias or a dropout, and only reads it without.
        let yp = self.ptr_mut(y, batch * tokens * channels, "branch y")?;
        let bp = match bias {
            Some(b) => self.ptr(b, channels, "branch bias")?,
            None => 0,
        };
        self.residual_into(
            residual, yp, bp, dropout, gate, out, batch, tokens, channels,
        )
    }
    fn residual_backward(
        &self,
        dresidual: Slice<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        branch: ResidualBranch<'_, CudaBuffer>,
        dy: SliceMut<'_, CudaBuffer>,
        dgate: Option<SliceMut<'_, CudaBuffer>>,
    ) -> Result<(), CudaError> {
        let ResidualBranch {
            dropout,
            gate,
            batch,
            tokens,
            channels,
            ..
        } = branch;
        self.gated_residual_backward_with(
            dresidual, y, gate, dy, dgate, dropout, batch, tokens, channels,
        )
    }
    fn rope_forward_and_copy(
        &self,
        shape: &RopeShape,
        x: SliceMut<'_, CudaBuffer>,
        copy_from: usize,
        dst: SliceMut<'_, CudaBuffer>,
        layout: &RowGroups,
    ) -> Result<(), CudaError> {
        // One launch where the copy's rows are the rotation's (the KV-cache append after a
        // pass's RoPE): same sequences, tokens and strides, columns from `copy_from` on.
        let same_rows = layout.groups == shape.batch
            && layout.rows == shape.tokens
            && layout.src_stride == shape.stride
            && copy_from + layout.cols <= shape.stride
            && (layout.groups <= 1 || layout.src_group_stride == shape.batch_stride);
        let SliceMut { buf, offset } = x;
        if !same_rows || layout.elements() == 0 {
            self.rope(shape, SliceMut::at(&mut *buf, offset), false)?;
            return self.copy_row_groups(Slice::at(&*buf, offset + copy_from), dst, layout);
        }
        let span = shape.extent().max(copy_from + layout.src_extent());
        let p = self.ptr_mut(SliceMut::at(buf, offset), span, "rope x")?;
        let d = self.ptr_mut(dst, layout.dst_extent(), "rope copy dst")?;
        let copy = (
            copy_from,
            layout.cols,
            d,
            layout.dst_stride,
            layout.dst_group_stride,
        );
        self.rope_at(shape, p, false, Some(copy))
    }
    fn bias_gelu_forward(
        &self,
        x: SliceMut<'_, CudaBuffer>,
        bias: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        let n = rows * cols;
        self.elements(n).bias_gelu_forward(
            self.ptr_mut(x, n, "bias_gelu x")?,
            self.ptr(bias, cols, "bias")?,
            self.ptr_mut(out, n, "bias_gelu out")?,
            rows as i64,
            cols as i64,
        )
    }
}
