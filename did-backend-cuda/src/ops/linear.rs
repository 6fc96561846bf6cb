//! [`LinearOps`]: GEMMs through cuBLAS (or the few-rows kernel of `kernels/linear.cu`), the bias
//! kernels, and the column sums of `kernels/elementwise.cu` that bias and gate gradients use.

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::DevicePtr;
use did_core::backend::prelude::*;
use did_core::backend::{Gemm, RowMajor, Slice, SliceMut};

use crate::buffer::*;
use crate::counters::Event;
use crate::device::*;
use crate::launch::*;
use crate::{few_rows, CudaError};

pub(crate) fn op(trans: bool) -> blas_sys::cublasOperation_t {
    if trans {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

pub(crate) fn to_i32(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| {
        CudaError::Shape(format!(
            "matmul: {what} = {v} exceeds cuBLAS's 32-bit sizes"
        ))
    })
}

impl LinearOps for CudaBackend {
    fn matmul(
        &self,
        g: &Gemm,
        a: Slice<'_, CudaBuffer>,
        b: Slice<'_, CudaBuffer>,
        c: SliceMut<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        let (ea, eb, ec) = g.extents();
        let (pa, pb, pc) = (
            self.ptr(a, ea, "matmul a")?,
            self.ptr(b, eb, "matmul b")?,
            self.ptr_mut(c, ec, "matmul c")?,
        );
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        if self.few_rows_kernel() {
            let aligned = |p: u64| p % 16 == 0;
            if let Some(kernel) = few_rows::kernel_for(g, 8, aligned(pa), aligned(pb)) {
                return self
                    .grid((few_rows::blocks(g.n), 1, 1), few_rows::THREADS)
                    .linear_few_rows(
                        kernel,
                        pa,
                        g.lda as i64,
                        pb,
                        g.ldb as i64,
                        pc,
                        g.ldc as i64,
                        g.m as i32,
                        g.n as i64,
                        g.k as i64,
                        g.beta,
                    );
            }
        }
        let dtype = match self.precision {
            Precision::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            Precision::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands.
        let (alpha, beta) = (g.alpha, g.beta);
        let ld = |v: usize| v.max(1);
        self.counters.add(Event::Gemm, 1);
        // SAFETY: the extents of all three operands were checked above.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(g.trans_b),
                op(g.trans_a),
                to_i32(g.n, "n")?,
                to_i32(g.m, "m")?,
                to_i32(g.k, "k")?,
                (&alpha) as *const f32 as *const _,
                pb as *const _,
                dtype,
                to_i32(ld(g.ldb), "ldb")?,
                g.stride_b as i64,
                pa as *const _,
                dtype,
                to_i32(ld(g.lda), "lda")?,
                g.stride_a as i64,
                (&beta) as *const f32 as *const _,
                pc as *mut _,
                dtype,
                to_i32(ld(g.ldc), "ldc")?,
                g.stride_c as i64,
                to_i32(g.batch, "batch")?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
    fn bias_add_rows(
        &self,
        x: SliceMut<'_, CudaBuffer>,
        bias: Slice<'_, CudaBuffer>,
        shape: RowMajor,
    ) -> Result<(), CudaError> {
        let xp = self.ptr_mut(x, shape.extent(), "bias_add x")?;
        let bp = self.ptr(bias, shape.cols, "bias")?;
        self.elements(shape.rows * shape.cols).bias_add(
            xp,
            bp,
            shape.rows as i64,
            shape.cols as i64,
            shape.stride as i64,
        )
    }
    fn bias_backward_rows(
        &self,
        dy: Slice<'_, CudaBuffer>,
        dbias: SliceMut<'_, CudaBuffer>,
        shape: RowMajor,
    ) -> Result<(), CudaError> {
        let d = self.ptr(dy, shape.extent(), "bias_backward dy")?;
        let out = self.ptr_mut(dbias, shape.cols, "dbias")?;
        self.column_sums(d, 0, out, 1, shape.rows, shape.cols, shape.stride)
    }
}

/// How a column sum's first pass tiles its input: rows a chunk (at least), columns a block.
#[derive(Clone, Copy)]
pub(crate) struct ChunkShape {
    pub(crate) min_rows: usize,
    pub(crate) cols_per_block: usize,
}

impl CudaBackend {
    /// `out[g, c] += Σ_r a[g, r, c]·b[g, r, c]` (`b = 0`: `a` alone) over `groups` groups of
    /// `rows` rows, rows `stride` elements apart (a group spans `rows · stride`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn column_sums(
        &self,
        a: u64,
        b: u64,
        out: u64,
        groups: usize,
        rows: usize,
        cols: usize,
        stride: usize,
    ) -> Result<(), CudaError> {
        // 32 columns × 8 row slices a block (kernels/elementwise.cu), 512 rows a chunk.
        let shape = ChunkShape {
            min_rows: 512,
            cols_per_block: 32,
        };
        self.column_sums_with(
            groups,
            rows,
            cols,
            out,
            shape,
            |partial, chunk_rows, grid| {
                self.grid(grid, COLSUM_THREADS).colsum_partial(
                    a,
                    b,
                    partial,
                    rows as i64,
                    cols as i64,
                    stride as i64,
                    chunk_rows as i64,
                )
            },
        )
    }

    /// The two passes of a column sum; `partial_pass` fills `[groups, chunks, cols]` partials
    /// (grid z over the groups, chunks of at least `shape.min_rows` rows).
    pub(crate) fn column_sums_with(
        &self,
        groups: usize,
        rows: usize,
        cols: usize,
        out: u64,
        shape: ChunkShape,
        partial_pass: impl FnOnce(u64, usize, (u32, u32, u32)) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        if groups == 0 || rows == 0 || cols == 0 {
            return Ok(());
        }
        let groups_u32 = u32::try_from(groups)
            .ok()
            .filter(|&g| g <= 65_535)
            .ok_or_else(|| {
                CudaError::Shape(format!("column sums over {groups} groups: at most 65,535"))
            })?;
        let chunk_rows = shape.min_rows.max(rows.div_ceil(65_535));
        let chunks = rows.div_ceil(chunk_rows);
        // Every partial is written by the first pass: no zeroing needed.
        // SAFETY: f32 has no invalid bit patterns; colsum_partial writes all groups × chunks × cols.
        let partial = unsafe { self.stream.alloc::<f32>(groups * chunks * cols) }?;
        let (pp, _sync) = partial.device_ptr(&self.stream);
        let grid = (
            cols.div_ceil(shape.cols_per_block) as u32,
            chunks as u32,
            groups_u32,
        );
        partial_pass(pp, chunk_rows, grid)?;
        self.elements(groups * cols).colsum_finish(
            pp,
            chunks as i64,
            out,
            cols as i64,
            groups as i64,
        )
    }
}
