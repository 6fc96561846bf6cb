//! The host side of `kernels/norm.cu`'s LayerNorm: [`NormOps`], and the adaLN modulation of
//! `kernels/elementwise.cu`.

use cudarc::driver::DevicePtr;
use did_core::backend::prelude::*;
use did_core::backend::{NormShape, Slice, SliceMut};

use crate::buffer::*;
use crate::device::*;
use crate::launch::*;
use crate::ops::linear::*;
use crate::CudaError;

impl NormOps for CudaBackend {
    fn layernorm_forward(
        &self,
        s: &NormShape,
        x: Slice<'_, CudaBuffer>,
        weight: Slice<'_, CudaBuffer>,
        bias: Option<Slice<'_, CudaBuffer>>,
        out: SliceMut<'_, CudaBuffer>,
        mean: SliceMut<'_, CudaBuffer>,
        rstd: SliceMut<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        self.layernorm(s, x, weight, bias, out, mean, rstd, [0; 3], 1)
    }
    fn layernorm_backward(
        &self,
        s: &NormShape,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        weight: Slice<'_, CudaBuffer>,
        mean: Slice<'_, CudaBuffer>,
        rstd: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        dweight: SliceMut<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        let n = s.rows * s.cols;
        let (dp, xp, wp) = (
            self.ptr(dout, n, "layernorm dout")?,
            self.ptr(x, n, "layernorm x")?,
            self.ptr(weight, s.cols, "layernorm weight")?,
        );
        // The saved statistics are checked but not read: the kernel recomputes
        // them in f32 (bf16-rounded ones lose x − mean; see norm.cu).
        self.ptr(mean, s.rows, "layernorm mean")?;
        self.ptr(rstd, s.rows, "layernorm rstd")?;
        let dxp = self.ptr_mut(dx, n, "layernorm dx")?;
        let dwp = self.ptr_mut(dweight, s.cols, "layernorm dweight")?;
        if s.rows == 0 || s.cols == 0 {
            return Ok(());
        }
        let stats = self.stream.alloc_zeros::<f32>(2 * s.rows)?;
        let (sp, _sync) = stats.device_ptr(&self.stream);
        let (rows, cols) = (s.rows as i64, s.cols as i64);
        self.grid((grid_rows(s.rows)?, 1, 1), norm_threads(s.cols))
            .layernorm_backward_dx(dp, xp, wp, dxp, sp, rows, cols, s.eps)?;
        let shape = ChunkShape {
            min_rows: ROWS_PER_CHUNK,
            cols_per_block: 128,
        };
        self.column_sums_with(
            1,
            s.rows,
            s.cols,
            dwp,
            shape,
            |partial, chunk_rows, grid| {
                self.grid(grid, 128).layernorm_dweight_partial(
                    dp,
                    xp,
                    sp,
                    partial,
                    rows,
                    cols,
                    chunk_rows as i64,
                )
            },
        )
    }
    fn modulate_forward(
        &self,
        x: Slice<'_, CudaBuffer>,
        shift: Slice<'_, CudaBuffer>,
        scale: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let n = batch * tokens * channels;
        self.elements(n).modulate_forward(
            self.ptr(x, n, "modulate x")?,
            self.ptr(shift, batch * channels, "modulate shift")?,
            self.ptr(scale, batch * channels, "modulate scale")?,
            self.ptr_mut(out, n, "modulate out")?,
            tokens as i64,
            channels as i64,
            n as i64,
        )
    }
    fn modulate_backward(
        &self,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        scale: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        dscale: SliceMut<'_, CudaBuffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let n = batch * tokens * channels;
        let dp = self.ptr(dout, n, "modulate dout")?;
        let xp = self.ptr(x, n, "modulate x")?;
        let sp = self.ptr(scale, batch * channels, "modulate scale")?;
        let dxp = self.ptr_mut(dx, n, "modulate dx")?;
        let dsp = self.ptr_mut(dscale, batch * channels, "modulate dscale")?;
        self.elements(n).modulate_backward_dx(
            dp,
            sp,
            dxp,
            tokens as i64,
            channels as i64,
            n as i64,
        )?;
        self.column_sums(dp, xp, dsp, batch, tokens, channels, channels)
    }
}

/// Threads of a LayerNorm block (one row each): one warp up to 1,024 columns, which holds the row
/// in registers after one round of loads (kernels/norm.cu, `row_in_registers`; 256 threads making
/// four dependent passes were much slower: docs/perf/gpu.md, "Measurements behind the code's
/// choices") — else THREADS. The forward and the backward must agree: the backward recomputes the
/// statistics in the forward's order.
pub(crate) fn norm_threads(cols: usize) -> u32 {
    if cols <= 1024 {
        32
    } else {
        THREADS
    }
}

impl CudaBackend {
    /// The LayerNorm kernel, with `modulation` = `[shift, scale, out]` pointers (zeros: none)
    /// for the fused pre-norm, `tokens` rows per sequence.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layernorm(
        &self,
        s: &NormShape,
        x: Slice<'_, CudaBuffer>,
        weight: Slice<'_, CudaBuffer>,
        bias: Option<Slice<'_, CudaBuffer>>,
        out: SliceMut<'_, CudaBuffer>,
        mean: SliceMut<'_, CudaBuffer>,
        rstd: SliceMut<'_, CudaBuffer>,
        modulation: [u64; 3],
        tokens: usize,
    ) -> Result<(), CudaError> {
        let n = s.rows * s.cols;
        let bp = match bias {
            Some(b) => self.ptr(b, s.cols, "layernorm bias")?,
            None => 0,
        };
        let [shift, scale, modulated] = modulation;
        let (xp, wp) = (
            self.ptr(x, n, "layernorm x")?,
            self.ptr(weight, s.cols, "layernorm weight")?,
        );
        let (op_, mp, rp) = (
            self.ptr_mut(out, n, "layernorm out")?,
            self.ptr_mut(mean, s.rows, "layernorm mean")?,
            self.ptr_mut(rstd, s.rows, "layernorm rstd")?,
        );
        if s.rows == 0 || s.cols == 0 {
            return Ok(());
        }
        self.grid((grid_rows(s.rows)?, 1, 1), norm_threads(s.cols))
            .layernorm_forward(
                xp,
                wp,
                bp,
                op_,
                mp,
                rp,
                s.rows as i64,
                s.cols as i64,
                s.eps,
                shift,
                scale,
                modulated,
                tokens as i64,
            )
    }
}
