//! Linear algebra: the strided batched GEMM ([`Gemm`]) and the bias ops beside it.

use super::{MemoryOps, RowMajor, Slice, SliceMut};

/// A strided batched GEMM, row-major:
/// `C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i]` for `i < batch`, with
/// `op(A)` of shape `m × k`, `op(B)` of shape `k × n`, `C` of shape `m × n`.
///
/// `lda`, `ldb`, `ldc` are the row strides of the matrices *as stored*
/// (`A` is stored `k × m` when `trans_a`). `beta = 1` accumulates.
///
/// ```
/// use did_core::backend::Gemm;
/// // y[T, out] = x[T, in] · Wᵀ with W stored [out, in] (PyTorch Linear layout).
/// let g = Gemm::linear(16, 768, 2304);
/// assert!(g.trans_b && !g.trans_a);
/// assert_eq!((g.m, g.n, g.k, g.ldb), (16, 2304, 768, 768));
/// assert_eq!(g.flops(), 2 * 16 * 2304 * 768);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Read `A` transposed.
    pub trans_a: bool,
    /// Read `B` transposed.
    pub trans_b: bool,
    /// Rows of `op(A)` and `C`.
    pub m: usize,
    /// Columns of `op(B)` and `C`.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Row stride of `A` as stored.
    pub lda: usize,
    /// Row stride of `B` as stored.
    pub ldb: usize,
    /// Row stride of `C`.
    pub ldc: usize,
    /// Number of matrices.
    pub batch: usize,
    /// Elements between consecutive `A` matrices.
    pub stride_a: usize,
    /// Elements between consecutive `B` matrices (0 broadcasts one `B`).
    pub stride_b: usize,
    /// Elements between consecutive `C` matrices.
    pub stride_c: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old `C` (0 overwrites, 1 accumulates).
    pub beta: f32,
}

impl Gemm {
    /// The forward of a linear layer: `y[rows, out] = x[rows, in] · Wᵀ`, `W` stored `[out, in]`.
    pub fn linear(rows: usize, d_in: usize, d_out: usize) -> Self {
        Gemm {
            trans_a: false,
            trans_b: true,
            m: rows,
            n: d_out,
            k: d_in,
            lda: d_in,
            ldb: d_in,
            ldc: d_out,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// The weight gradient of a linear layer: `dW[out, in] += dy[rows, out]ᵀ · x[rows, in]`.
    ///
    /// ```
    /// use did_core::backend::Gemm;
    /// let g = Gemm::linear_weight_grad(16, 768, 2304);
    /// assert_eq!((g.m, g.n, g.k, g.beta), (2304, 768, 16, 1.0));
    /// ```
    pub fn linear_weight_grad(rows: usize, d_in: usize, d_out: usize) -> Self {
        Gemm {
            trans_a: true,
            trans_b: false,
            m: d_out,
            n: d_in,
            k: rows,
            lda: d_out,
            ldb: d_in,
            ldc: d_in,
            beta: 1.0,
            ..Gemm::linear(rows, d_in, d_out)
        }
    }

    /// The input gradient of a linear layer: `dx[rows, in] = dy[rows, out] · W[out, in]`
    /// (overwrites; use [`Gemm::accumulate`] to add).
    ///
    /// ```
    /// use did_core::backend::Gemm;
    /// let g = Gemm::linear_input_grad(16, 768, 2304).accumulate();
    /// assert_eq!((g.m, g.n, g.k, g.beta), (16, 768, 2304, 1.0));
    /// ```
    pub fn linear_input_grad(rows: usize, d_in: usize, d_out: usize) -> Self {
        Gemm {
            trans_a: false,
            trans_b: false,
            m: rows,
            n: d_in,
            k: d_out,
            lda: d_out,
            ldb: d_in,
            ldc: d_in,
            ..Gemm::linear(rows, d_in, d_out)
        }
    }

    /// The same GEMM adding into `C` (`beta = 1`).
    pub fn accumulate(self) -> Self {
        Gemm { beta: 1.0, ..self }
    }

    /// Floating-point operations (multiply and add counted separately).
    pub fn flops(&self) -> usize {
        2 * self.m * self.n * self.k * self.batch
    }

    /// Elements that `A`, `B` and `C` span from their offsets (what a backend
    /// checks against its buffers before it runs the GEMM).
    ///
    /// ```
    /// use did_core::backend::Gemm;
    /// // x[16, 768] · Wᵀ, W [2304, 768] → y[16, 2304]
    /// assert_eq!(Gemm::linear(16, 768, 2304).extents(), (16 * 768, 2304 * 768, 16 * 2304));
    /// ```
    pub fn extents(&self) -> (usize, usize, usize) {
        let last = |rows: usize, cols: usize, ld: usize, stride: usize| {
            if rows == 0 || cols == 0 || self.batch == 0 {
                0
            } else {
                (self.batch - 1) * stride + (rows - 1) * ld + cols
            }
        };
        let a = if self.trans_a {
            last(self.k, self.m, self.lda, self.stride_a)
        } else {
            last(self.m, self.k, self.lda, self.stride_a)
        };
        let b = if self.trans_b {
            last(self.n, self.k, self.ldb, self.stride_b)
        } else {
            last(self.k, self.n, self.ldb, self.stride_b)
        };
        (a, b, last(self.m, self.n, self.ldc, self.stride_c))
    }
}

/// The GEMM and its bias ops.
///
/// ```
/// use did_core::backend::{Gemm, LinearOps, Slice, SliceMut};
/// /// y[rows, d_out] = x[rows, d_in] · Wᵀ + b, with W stored [d_out, d_in].
/// fn linear<B: LinearOps>(
///     be: &B, x: Slice<'_, B::Buffer>, w: Slice<'_, B::Buffer>, b: Slice<'_, B::Buffer>,
///     y: SliceMut<'_, B::Buffer>, rows: usize, d_in: usize, d_out: usize,
/// ) -> Result<(), B::Error> {
///     let SliceMut { buf, offset } = y;
///     be.matmul(&Gemm::linear(rows, d_in, d_out), x, w, SliceMut::at(&mut *buf, offset))?;
///     be.bias_add(SliceMut::at(buf, offset), b, rows, d_out)
/// }
/// ```
pub trait LinearOps: MemoryOps {
    /// A strided batched GEMM (see [`Gemm`]). Its backward is two more GEMMs.
    fn matmul(
        &self,
        spec: &Gemm,
        a: Slice<'_, Self::Buffer>,
        b: Slice<'_, Self::Buffer>,
        c: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
    /// `x[rows, cols] += bias[cols]` for every row. Provided: [`LinearOps::bias_add_rows`] over
    /// dense rows.
    fn bias_add(
        &self,
        x: SliceMut<'_, Self::Buffer>,
        bias: Slice<'_, Self::Buffer>,
        rows: usize,
        cols: usize,
    ) -> Result<(), Self::Error> {
        self.bias_add_rows(x, bias, RowMajor::dense(rows, cols))
    }
    /// `x[r, c] += bias[c]` for the `shape.cols` values of each of `shape.rows` rows; the
    /// padding between rows is left as it is.
    fn bias_add_rows(
        &self,
        x: SliceMut<'_, Self::Buffer>,
        bias: Slice<'_, Self::Buffer>,
        shape: RowMajor,
    ) -> Result<(), Self::Error>;
    /// `dbias[cols] += Σ_rows dy[rows, cols]`. Provided: [`LinearOps::bias_backward_rows`] over
    /// dense rows.
    fn bias_backward(
        &self,
        dy: Slice<'_, Self::Buffer>,
        dbias: SliceMut<'_, Self::Buffer>,
        rows: usize,
        cols: usize,
    ) -> Result<(), Self::Error> {
        self.bias_backward_rows(dy, dbias, RowMajor::dense(rows, cols))
    }
    /// `dbias[c] += Σ_r dy[r, c]` over the values of `shape`'s rows (the padding is not read).
    fn bias_backward_rows(
        &self,
        dy: Slice<'_, Self::Buffer>,
        dbias: SliceMut<'_, Self::Buffer>,
        shape: RowMajor,
    ) -> Result<(), Self::Error>;
}
