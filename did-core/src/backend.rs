//! The compute primitives a backend implements: the [`Backend`] trait.
//!
//! The granularity is the layer op, the size of an llm.c kernel. The model
//! code in did-core decides the order of ops once; a backend is free to fuse
//! inside an op. Every differentiable op has its forward and its backward
//! side by side.
//!
//! # Conventions
//!
//! - Buffers hold floats. Their storage precision is the backend's (f32, or
//!   bf16 storage with f32 accumulation); the host always sees f32.
//! - Tensors are row-major. A [`Slice`] is a buffer plus an element offset, so
//!   parameters and gradients can live in one flat buffer each (llm.c style;
//!   one gradient buffer makes a data-parallel all-reduce a single call).
//! - **Backward ops accumulate** (`+=`) into every gradient they produce, input
//!   gradients included; the trainer zeroes gradients once per step.
//! - Activation layout is `[batch, tokens, channels]`; attention heads are
//!   contiguous inside a token (`channel = head · head_dim + d`).
//! - Random draws (dropout, sampling) come from [`crate::rng`] streams, so
//!   every backend draws the same numbers.

use core::fmt;

use crate::mask::AttentionMask;
use crate::rng::RngStream;
use crate::sample::categorical::{draw_token, DrawScratch, SampledToken};
use crate::sample::nucleus::Nucleus;

/// A read-only view: a buffer and the element offset where the tensor starts.
#[derive(Debug)]
pub struct Slice<'a, T: ?Sized> {
    /// The buffer.
    pub buf: &'a T,
    /// The first element.
    pub offset: usize,
}

impl<T: ?Sized> Clone for Slice<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for Slice<'_, T> {}

/// A writable view: a buffer and the element offset where the tensor starts.
#[derive(Debug)]
pub struct SliceMut<'a, T: ?Sized> {
    /// The buffer.
    pub buf: &'a mut T,
    /// The first element.
    pub offset: usize,
}

impl<'a, T: ?Sized> Slice<'a, T> {
    /// The whole buffer from element 0.
    pub fn whole(buf: &'a T) -> Self {
        Slice { buf, offset: 0 }
    }
    /// The same buffer from `offset` further on.
    pub fn at(buf: &'a T, offset: usize) -> Self {
        Slice { buf, offset }
    }
}

impl<'a, T: ?Sized> SliceMut<'a, T> {
    /// The whole buffer from element 0.
    pub fn whole(buf: &'a mut T) -> Self {
        SliceMut { buf, offset: 0 }
    }
    /// The same buffer from `offset` further on.
    pub fn at(buf: &'a mut T, offset: usize) -> Self {
        SliceMut { buf, offset }
    }
}

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

/// The first token id of `ids` that is not below `rows` (a table's row
/// count), with its index: what a backend reports instead of reading past an
/// embedding table or a vocabulary.
///
/// ```
/// use did_core::backend::first_id_outside;
/// assert_eq!(first_id_outside(&[0, 5, 2, 9], 4), Some((1, 5)));
/// assert_eq!(first_id_outside(&[0, 3], 4), None);
/// ```
pub fn first_id_outside(ids: &[u32], rows: usize) -> Option<(usize, u32)> {
    ids.iter()
        .position(|&id| id as usize >= rows)
        .map(|i| (i, ids[i]))
}

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

/// The shape of an attention call.
///
/// `q` is `[batch, q_len, heads·head_dim]` with token stride `q_stride`;
/// `k` and `v` are `[batch, kv_len, heads·head_dim]` with token strides
/// `k_stride`, `v_stride` (a fused qkv buffer has stride `3·C`); `out` is
/// `[batch, q_len, heads·head_dim]`, contiguous. Each sequence's keys start
/// `kv_batch_stride` elements after the previous one's (a KV cache may be
/// longer than `kv_len`). Which query sees which key is `mask`'s business.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Queries per sequence.
    pub q_len: usize,
    /// Keys per sequence.
    pub kv_len: usize,
    /// Element stride between query tokens.
    pub q_stride: usize,
    /// Element stride between key tokens.
    pub k_stride: usize,
    /// Element stride between value tokens.
    pub v_stride: usize,
    /// Elements between one sequence's queries and the next's.
    pub q_batch_stride: usize,
    /// Elements between one sequence's keys/values and the next's.
    pub kv_batch_stride: usize,
    /// Softmax scale, `1/√head_dim`.
    pub scale: f32,
}

/// Elements each operand of an attention call spans from its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionExtents {
    /// `q` (and its gradient).
    pub q: usize,
    /// `k` (and its gradient).
    pub k: usize,
    /// `v` (and its gradient).
    pub v: usize,
    /// `out` and `dout` (contiguous).
    pub out: usize,
    /// `lse`: one per (sequence, head, query).
    pub lse: usize,
}

/// Where [`Backend::attention_backward`] puts the gradients of `q`, `k` and `v`
/// in its one gradient buffer: each laid out like its input (the
/// [`AttentionShape`]'s token and sequence strides) from its offset here. A
/// fused `[tokens, 3·C]` qkv input takes [`QkvOffsets::fused`], and its gradient
/// is then one `[tokens, 3·C]` matrix.
///
/// ```
/// use did_core::backend::{AttentionShape, QkvOffsets};
/// // Four tokens of a fused qkv row, 2 heads of 8: C = 16, rows of 48.
/// let s = AttentionShape { batch: 1, heads: 2, head_dim: 8, q_len: 4, kv_len: 4,
///     q_stride: 48, k_stride: 48, v_stride: 48, q_batch_stride: 4 * 48, kv_batch_stride: 4 * 48,
///     scale: 8f32.sqrt().recip() };
/// let at = QkvOffsets::fused(16);
/// assert_eq!((at.q, at.k, at.v), (0, 16, 32));
/// // The gradient buffer must reach the end of the last of the three.
/// assert_eq!(at.span(&s.extents()?), 32 + 3 * 48 + 16);
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvOffsets {
    /// Where `dq` starts.
    pub q: usize,
    /// Where `dk` starts.
    pub k: usize,
    /// Where `dv` starts.
    pub v: usize,
}

impl QkvOffsets {
    /// The gradients of a fused qkv row of `3·width` (queries, keys, values).
    pub fn fused(width: usize) -> Self {
        QkvOffsets {
            q: 0,
            k: width,
            v: 2 * width,
        }
    }

    /// The elements a gradient buffer needs from its offset: to the end of the
    /// farthest of the three.
    pub fn span(&self, e: &AttentionExtents) -> usize {
        (self.q + e.q).max(self.k + e.k).max(self.v + e.v)
    }
}

impl AttentionShape {
    /// Self-attention over fused `[q | k | v]` rows, `[batch, tokens, 3·heads·head_dim]`
    /// (keys and values at offsets `C` and `2·C` of the same buffer), scaled by 1/√head_dim.
    ///
    /// ```
    /// use did_core::backend::AttentionShape;
    /// let s = AttentionShape::fused_qkv(2, 4, 8, 5);
    /// assert_eq!((s.q_stride, s.k_stride, s.kv_batch_stride, s.kv_len), (96, 96, 5 * 96, 5));
    /// assert_eq!(s.scale, 8f32.sqrt().recip());
    /// ```
    pub fn fused_qkv(batch: usize, heads: usize, head_dim: usize, tokens: usize) -> Self {
        let row = 3 * heads * head_dim;
        AttentionShape {
            batch,
            heads,
            head_dim,
            q_len: tokens,
            kv_len: tokens,
            q_stride: row,
            k_stride: row,
            v_stride: row,
            q_batch_stride: tokens * row,
            kv_batch_stride: tokens * row,
            scale: libm::sqrtf(head_dim as f32).recip(),
        }
    }

    /// Queries from fused qkv rows `[batch, q_len, 3·C]` against a KV cache whose slots hold a
    /// key then a value (`[batch, capacity, 2·C]`: values at offset `C`), `kv_len` slots read
    /// from wherever the caller points `k` and `v`; scaled by 1/√head_dim.
    ///
    /// ```
    /// use did_core::backend::AttentionShape;
    /// // A draft block of 4 after 60 cached tokens, in a cache of 128 slots.
    /// let s = AttentionShape::over_cache(1, 4, 8, 4, 64, 128);
    /// assert_eq!((s.q_stride, s.k_stride, s.v_stride, s.kv_batch_stride), (96, 64, 64, 128 * 64));
    /// assert_eq!((s.q_len, s.kv_len, s.q_batch_stride), (4, 64, 4 * 96));
    /// ```
    pub fn over_cache(
        batch: usize,
        heads: usize,
        head_dim: usize,
        q_len: usize,
        kv_len: usize,
        capacity: usize,
    ) -> Self {
        let slot = 2 * heads * head_dim;
        AttentionShape {
            q_len,
            kv_len,
            k_stride: slot,
            v_stride: slot,
            q_batch_stride: q_len * 3 * heads * head_dim,
            kv_batch_stride: capacity * slot,
            ..Self::fused_qkv(batch, heads, head_dim, q_len)
        }
    }

    /// The extents of every operand, or why the shape is inconsistent (token
    /// strides smaller than `heads · head_dim`).
    ///
    /// ```
    /// use did_core::backend::AttentionShape;
    /// // A fused qkv buffer [2, 8, 3·32] with 4 heads of 8.
    /// let s = AttentionShape { batch: 2, heads: 4, head_dim: 8, q_len: 8, kv_len: 8,
    ///     q_stride: 96, k_stride: 96, v_stride: 96, q_batch_stride: 8 * 96, kv_batch_stride: 8 * 96,
    ///     scale: 8f32.sqrt().recip() };
    /// let e = s.extents()?;
    /// assert_eq!((e.q, e.out, e.lse), (8 * 96 + 7 * 96 + 32, 2 * 8 * 32, 2 * 4 * 8));
    /// # Ok::<(), String>(())
    /// ```
    pub fn extents(&self) -> Result<AttentionExtents, alloc::string::String> {
        let width = self.heads * self.head_dim;
        if self.q_stride < width || self.k_stride < width || self.v_stride < width {
            return Err(alloc::format!(
                "attention: token strides (q {}, k {}, v {}) are smaller than heads × head_dim = {width}",
                self.q_stride, self.k_stride, self.v_stride
            ));
        }
        let span = |len: usize, stride: usize, bstride: usize| {
            if self.batch == 0 || len == 0 {
                0
            } else {
                (self.batch - 1) * bstride + (len - 1) * stride + width
            }
        };
        Ok(AttentionExtents {
            q: span(self.q_len, self.q_stride, self.q_batch_stride),
            k: span(self.kv_len, self.k_stride, self.kv_batch_stride),
            v: span(self.kv_len, self.v_stride, self.kv_batch_stride),
            out: self.batch * self.q_len * width,
            lse: self.batch * self.heads * self.q_len,
        })
    }
}

/// RoPE (rotate-half, GPT-NeoX layout) over `[batch, tokens, heads·head_dim]`
/// with token stride `stride`; token `t` has position `position_offset + t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Heads.
    pub heads: usize,
    /// Channels per head (the rotary dimension).
    pub head_dim: usize,
    /// Element stride between tokens.
    pub stride: usize,
    /// Elements between sequences.
    pub batch_stride: usize,
    /// Position of token 0.
    pub position_offset: usize,
    /// Frequency base (10,000).
    pub base: f32,
}

impl RopeShape {
    /// Elements the rotated tensor spans from its offset.
    ///
    /// ```
    /// use did_core::backend::RopeShape;
    /// // The keys inside a fused qkv buffer [2, 8, 3·32]: stride 96, 32 wide.
    /// let s = RopeShape { batch: 2, tokens: 8, heads: 4, head_dim: 8, stride: 96,
    ///     batch_stride: 8 * 96, position_offset: 0, base: 10_000.0 };
    /// assert_eq!(s.extent(), 8 * 96 + 7 * 96 + 32);
    /// ```
    pub fn extent(&self) -> usize {
        if self.batch == 0 || self.tokens == 0 {
            0
        } else {
            (self.batch - 1) * self.batch_stride
                + (self.tokens - 1) * self.stride
                + self.heads * self.head_dim
        }
    }
}

/// A backend's recording of a sequence of its ops (on CUDA, a graph), replayed by
/// [`Backend::replay_recording`]: a batch-1 draft call is ≈ 150 launches of a few µs of work
/// each, which one recorded launch replaces.
///
/// ```
/// use did_core::backend::RecordingId;
/// assert_ne!(RecordingId(1), RecordingId(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordingId(pub u64);

/// What consumes a linear forward's output `y = x·Wᵀ` next in a block, for
/// [`Backend::linear_forward_then`]: a backend may compute both in one pass (on CUDA, the
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
    /// [`Backend::bias_gelu_forward`] on `y`: `y += bias` (kept for the backward), then
    /// `gelu = gelu_tanh(y)`.
    BiasGelu {
        /// `[d_out]`.
        bias: Slice<'a, T>,
        /// `[rows, d_out]`.
        gelu: SliceMut<'a, T>,
    },
    /// `y += bias` where there is one, then `out = residual + gate·y`
    /// ([`Backend::bias_gated_residual_forward_into`], or
    /// [`Backend::gated_residual_forward_into`] without a bias): a branch's projection into the
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

/// [`Backend::linear_forward_then`] as its two calls: [`Backend::matmul`], then the op `then`
/// names. The trait's provided version, and a backend's own where it does not fuse a shape.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward_then_in_steps<B: Backend + ?Sized>(
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

/// A row-major `[rows, cols]` matrix whose rows start `stride ≥ cols` elements apart: the
/// output head's logits, laid out with the row stride its backend's GEMMs read fastest
/// ([`Backend::padded_row_stride`]). The `stride − cols` elements after each row are never
/// read as values and may hold anything.
///
/// ```
/// use did_core::backend::RowMajor;
/// let logits = RowMajor::padded(3, 50_258, 50_304);
/// assert_eq!(logits.extent(), 2 * 50_304 + 50_258);
/// assert_eq!(RowMajor::dense(3, 5).extent(), 15);
/// assert_eq!(RowMajor::dense(0, 5).extent(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMajor {
    /// Rows.
    pub rows: usize,
    /// Elements of a row that hold values.
    pub cols: usize,
    /// Elements from one row's start to the next's (≥ `cols`).
    pub stride: usize,
}

impl RowMajor {
    /// Rows stored back to back (`stride = cols`).
    pub fn dense(rows: usize, cols: usize) -> Self {
        RowMajor {
            rows,
            cols,
            stride: cols,
        }
    }

    /// Rows `stride` elements apart; a stride below `cols` is taken as `cols`.
    pub fn padded(rows: usize, cols: usize, stride: usize) -> Self {
        RowMajor {
            rows,
            cols,
            stride: stride.max(cols),
        }
    }

    /// Elements the matrix spans from its offset: `(rows − 1) · stride + cols`, 0 when empty.
    pub fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.stride + self.cols
        }
    }
}

/// One tensor's inverted dropout: probability `p`, the mask drawn from `stream` as
/// [`Backend::dropout`] draws it (element `i` kept iff `stream.uniform_f32(0, i) ≥ p`).
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

/// Where a grouped row copy reads and writes: `groups` groups of `rows` rows of
/// `cols` elements; row `r` of group `g` starts `g · group_stride + r · stride`
/// elements from the slice's offset, on each side with its own strides. One
/// call moves a whole batch (every sequence's keys into its KV-cache slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGroups {
    /// Groups (sequences).
    pub groups: usize,
    /// Rows per group.
    pub rows: usize,
    /// Elements per row.
    pub cols: usize,
    /// Source elements between rows.
    pub src_stride: usize,
    /// Source elements between groups.
    pub src_group_stride: usize,
    /// Destination elements between rows.
    pub dst_stride: usize,
    /// Destination elements between groups.
    pub dst_group_stride: usize,
}

impl RowGroups {
    /// One group of `rows` rows (what [`Backend::copy_rows`] moves).
    ///
    /// ```
    /// use did_core::backend::RowGroups;
    /// let r = RowGroups::rows(3, 2, 5, 4);
    /// assert_eq!((r.groups, r.src_extent(), r.dst_extent()), (1, 12, 10));
    /// ```
    pub fn rows(rows: usize, cols: usize, src_stride: usize, dst_stride: usize) -> Self {
        RowGroups {
            groups: 1,
            rows,
            cols,
            src_stride,
            src_group_stride: 0,
            dst_stride,
            dst_group_stride: 0,
        }
    }

    /// Elements the source spans from its offset (0 when nothing moves).
    ///
    /// ```
    /// use did_core::backend::RowGroups;
    /// // 4 new tokens of 2 sequences, keys at column 8 of a fused [2, 4, 24] qkv buffer.
    /// let r = RowGroups { groups: 2, rows: 4, cols: 8, src_stride: 24,
    ///     src_group_stride: 4 * 24, dst_stride: 8, dst_group_stride: 16 * 8 };
    /// assert_eq!(r.src_extent(), 96 + 3 * 24 + 8);
    /// assert_eq!(r.dst_extent(), 128 + 3 * 8 + 8);
    /// ```
    pub fn src_extent(&self) -> usize {
        self.extent(self.src_stride, self.src_group_stride)
    }

    /// Elements the destination spans from its offset (0 when nothing moves).
    pub fn dst_extent(&self) -> usize {
        self.extent(self.dst_stride, self.dst_group_stride)
    }

    /// Elements moved.
    pub fn elements(&self) -> usize {
        self.groups * self.rows * self.cols
    }

    fn extent(&self, stride: usize, group_stride: usize) -> usize {
        if self.elements() == 0 {
            0
        } else {
            (self.groups - 1) * group_stride + (self.rows - 1) * stride + self.cols
        }
    }
}

/// AdamW hyper-parameters for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate of this step (after warm-up).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// 1-based step, for bias correction.
    pub step: u32,
}

impl Default for AdamW {
    /// BD3-LM's defaults: lr 3e-4, β = (0.9, 0.999), ε = 1e-8, no weight decay.
    fn default() -> Self {
        AdamW {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        }
    }
}

/// One optimizer update as [`Backend::optimizer_step`] applies it: the clip factor, AdamW, the
/// EMA's decay.
///
/// ```
/// use did_core::backend::{AdamW, OptimizerStep};
/// let step = OptimizerStep { adamw: AdamW::default(), grad_scale: 0.5, ema_decay: Some(0.999) };
/// assert_eq!(step.adamw.lr, 3e-4);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerStep {
    /// The AdamW hyper-parameters of this step.
    pub adamw: AdamW,
    /// What the gradients are multiplied by first (gradient-norm clipping; 1 leaves them).
    pub grad_scale: f32,
    /// The EMA's decay this step; `None` leaves the EMA (if any) as it is.
    pub ema_decay: Option<f32>,
}

/// Weights an optimizer updates: `master`, kept in f32 whatever the storage (from
/// [`Backend::upload_f32`]), and — on a backend that stores below f32
/// ([`Backend::stores_below_f32`]) — `rounded`, the copy in the storage precision that the
/// model reads, rewritten from `master` by every update. Where storage is f32 the master is what
/// the model reads and `rounded` is `None`.
///
/// ```
/// use did_core::backend::{Slice, SliceMut, UpdatedWeights};
/// let mut master = vec![0.5f32; 4];
/// let w = UpdatedWeights { master: SliceMut::whole(&mut master), rounded: None };
/// assert!(w.rounded.is_none());
/// ```
#[derive(Debug)]
pub struct UpdatedWeights<'a, T: ?Sized> {
    /// The weights in f32.
    pub master: SliceMut<'a, T>,
    /// Their copy in the storage precision, where that is below f32.
    pub rounded: Option<SliceMut<'a, T>>,
}

/// Where one sampled token's random numbers come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawSpec {
    /// The categorical stream of the sequence at its current step.
    pub stream: RngStream,
    /// The row of the stream (the position).
    pub row: u32,
}

/// The compute primitives of a backend. See the module docs for conventions.
///
/// Model code is written once over `B: Backend`, llm.c style:
///
/// ```
/// use did_core::backend::{Backend, Gemm, Slice, SliceMut};
/// /// y[rows, d_out] = x[rows, d_in] · Wᵀ + b, with W stored [d_out, d_in].
/// fn linear_forward<B: Backend>(
///     backend: &B, x: Slice<'_, B::Buffer>, w: Slice<'_, B::Buffer>, b: Slice<'_, B::Buffer>,
///     mut y: SliceMut<'_, B::Buffer>, rows: usize, d_in: usize, d_out: usize,
/// ) -> Result<(), B::Error> {
///     backend.matmul(&Gemm::linear(rows, d_in, d_out), x, w, SliceMut { buf: &mut *y.buf, offset: y.offset })?;
///     backend.bias_add(y, b, rows, d_out)
/// }
/// ```
pub trait Backend {
    /// A device buffer of floats.
    type Buffer;
    /// A device buffer of token ids.
    type Ids;
    /// The backend's error.
    type Error: fmt::Debug + fmt::Display;

    /// A short name for logs ("cpu", "cuda:0 bf16").
    fn name(&self) -> &str;

    // ---- memory -------------------------------------------------------

    /// A buffer of `len` floats, zeroed.
    fn zeros(&self, len: usize) -> Result<Self::Buffer, Self::Error>;
    /// `len` zeros kept in f32 whatever the storage precision: the attention's log-sum-exp,
    /// which scales a whole row of probabilities in the backward (stored in bf16 its rounding,
    /// up to |lse|·2⁻⁹, would scale them by e^{±that}). [`Backend::download`] and
    /// [`Backend::fill`] take it like any buffer; the attention ops take it as `lse`. Provided:
    /// [`Backend::zeros`] (an f32 backend stores everything in f32).
    fn zeros_f32(&self, len: usize) -> Result<Self::Buffer, Self::Error> {
        self.zeros(len)
    }
    /// The row stride this backend's GEMMs read and write fastest for a matrix of `cols`
    /// columns: what the model lays the output head's logits out with ([`RowMajor`]). Provided:
    /// `cols`. A GPU backend rounds it up (cuBLAS reads rows that are not 16-byte aligned with
    /// narrow loads: GPT-2's 50,258 columns in bf16 are 100,516 bytes).
    ///
    /// ```
    /// use did_core::backend::Backend;
    /// fn logits_len<B: Backend>(be: &B, rows: usize, vocab: usize) -> usize {
    ///     rows * be.padded_row_stride(vocab)
    /// }
    /// ```
    fn padded_row_stride(&self, cols: usize) -> usize {
        cols
    }
    /// A buffer holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buffer, Self::Error>;
    /// Whether this backend stores buffers below f32 (bf16): then an optimizer keeps its master
    /// weights, moments and EMA in f32 buffers ([`Backend::upload_f32`]) and the model reads
    /// copies rounded to the storage ([`Backend::round_into`]), since an update smaller than
    /// half a bf16 step of its weight (2⁻⁹ relative: an AdamW step of 3e-4 on a LayerNorm
    /// weight of 1, or any EMA update at decay 0.9999) would round back to the old value.
    /// Provided: `false`. A backend that says `true` overrides [`Backend::optimizer_step`] (as
    /// the CUDA backend does) or has [`Backend::scale`], [`Backend::adamw`] and
    /// [`Backend::ema_update`] take those f32 buffers, which the provided update passes them.
    ///
    /// ```
    /// use did_core::backend::Backend;
    /// fn optimizer_bytes<B: Backend>(be: &B, params: usize) -> usize {
    ///     // master, m, v in f32, plus the rounded copy where storage is below f32
    ///     params * (12 + if be.stores_below_f32() { 2 } else { 0 })
    /// }
    /// ```
    fn stores_below_f32(&self) -> bool {
        false
    }
    /// A buffer holding `host` in f32 whatever the storage precision, like
    /// [`Backend::zeros_f32`]: master weights, AdamW moments and the EMA
    /// ([`Backend::optimizer_step`]). Provided: [`Backend::upload`].
    fn upload_f32(&self, host: &[f32]) -> Result<Self::Buffer, Self::Error> {
        self.upload(host)
    }
    /// Writes `len` f32 values of `src` (from [`Backend::upload_f32`] or
    /// [`Backend::zeros_f32`]) into `dst` in the storage precision, rounded to nearest even.
    /// Provided: [`Backend::copy`] (storage is f32).
    fn round_into(
        &self,
        src: Slice<'_, Self::Buffer>,
        dst: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error> {
        self.copy(src, dst, len)
    }
    /// Copies `out.len()` elements starting at `src.offset` to the host.
    fn download(&self, src: Slice<'_, Self::Buffer>, out: &mut [f32]) -> Result<(), Self::Error>;
    /// Token ids on the device.
    fn upload_ids(&self, host: &[u32]) -> Result<Self::Ids, Self::Error>;
    /// Sets `len` elements to `value`.
    fn fill(
        &self,
        dst: SliceMut<'_, Self::Buffer>,
        len: usize,
        value: f32,
    ) -> Result<(), Self::Error>;
    /// Copies `len` elements.
    fn copy(
        &self,
        src: Slice<'_, Self::Buffer>,
        dst: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// Copies `rows` rows of `cols` elements between row strides `src_stride`
    /// and `dst_stride` (gathering keys into a cache, one half of the 2L stream).
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        src: Slice<'_, Self::Buffer>,
        src_stride: usize,
        dst: SliceMut<'_, Self::Buffer>,
        dst_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = dst;
        for r in 0..rows {
            self.copy(
                Slice::at(src.buf, src.offset + r * src_stride),
                SliceMut::at(&mut *buf, offset + r * dst_stride),
                cols,
            )?;
        }
        Ok(())
    }
    /// Copies groups of strided rows ([`RowGroups`]): one call for what would
    /// be `groups` calls of [`Backend::copy_rows`] (a GPU backend launches once).
    fn copy_row_groups(
        &self,
        src: Slice<'_, Self::Buffer>,
        dst: SliceMut<'_, Self::Buffer>,
        layout: &RowGroups,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = dst;
        for g in 0..layout.groups {
            self.copy_rows(
                Slice::at(src.buf, src.offset + g * layout.src_group_stride),
                layout.src_stride,
                SliceMut::at(&mut *buf, offset + g * layout.dst_group_stride),
                layout.dst_stride,
                layout.rows,
                layout.cols,
            )?;
        }
        Ok(())
    }
    /// Writes `host` into `ids`, keeping its device address where it fits, so that a
    /// [recording](Backend::begin_recording) that reads `ids` reads the new ones when replayed.
    /// Provided: a fresh upload (a new address; such a backend does not record).
    fn upload_ids_into(&self, host: &[u32], ids: &mut Self::Ids) -> Result<(), Self::Error> {
        *ids = self.upload_ids(host)?;
        Ok(())
    }

    // ---- recordings (CUDA graphs) ---------------------------------------

    /// Whether this backend can record a sequence of ops and replay it
    /// ([`Backend::begin_recording`]). Provided: no.
    fn can_record(&self) -> bool {
        false
    }
    /// Starts recording: until [`Backend::end_recording`], ops are recorded, not run. Only
    /// called where [`Backend::can_record`]; the ops recorded must read and write the same
    /// buffers, at the same addresses, each time the recording is replayed.
    fn begin_recording(&self) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Ends recording: the recording, not yet run, or `None` where nothing usable was recorded
    /// (the recorded ops' outputs are then undefined: run them again without recording).
    fn end_recording(&self) -> Result<Option<RecordingId>, Self::Error> {
        Ok(None)
    }
    /// Runs a recording again, over what its buffers hold now.
    fn replay_recording(&self, id: RecordingId) -> Result<(), Self::Error> {
        let _ = id;
        Ok(())
    }
    /// Frees a recording.
    fn forget_recording(&self, id: RecordingId) {
        let _ = id;
    }
    /// Told that a pass could not be recorded — `why` is the error of [`Backend::begin_recording`],
    /// [`Backend::end_recording`] or an op while recording, `None` where the recording ended
    /// with nothing usable. The pass then runs unrecorded and its caller records no more, so
    /// nothing fails; this is where a backend keeps the reason to report it. Provided: ignored.
    fn recording_failed(&self, why: Option<&Self::Error>) {
        let _ = why;
    }

    /// Waits for queued work (a no-op on synchronous backends).
    fn synchronize(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    // ---- linear algebra -----------------------------------------------

    /// A strided batched GEMM (see [`Gemm`]). Its backward is two more GEMMs.
    fn matmul(
        &self,
        spec: &Gemm,
        a: Slice<'_, Self::Buffer>,
        b: Slice<'_, Self::Buffer>,
        c: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
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
    /// `x[rows, cols] += bias[cols]` for every row. Provided: [`Backend::bias_add_rows`] over
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
    /// `dbias[cols] += Σ_rows dy[rows, cols]`. Provided: [`Backend::bias_backward_rows`] over
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

    // ---- normalisation and modulation ---------------------------------

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
    /// `Σ_rows dout` from [`Backend::bias_backward`] (gradients of one layer
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
    /// gradient is `Σ_t dout`: [`Backend::bias_backward`] over each sequence.
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
    /// LayerNorm, then adaLN modulation of its output (the DiT's pre-norm), in one call:
    /// `ln_out`, `mean`, `rstd` as [`Backend::layernorm_forward`] writes them (the backward
    /// needs them) and `out` as [`Backend::modulate_forward`] writes it from `ln_out`, with
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
    /// Gated residual out of place: `out = residual + gate·y`, as
    /// [`Backend::gated_residual_forward`] on a copy of `residual`. The provided version copies
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
    /// for the backward). The provided version calls [`Backend::bias_add`] and
    /// [`Backend::gated_residual_forward_into`]; a backend may fuse them.
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
    /// [`Backend::bias_add`], [`Backend::dropout`] and [`Backend::gated_residual_forward_into`];
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
    /// [`Backend::gated_residual_backward`], then the branch's dropout backward on `dy` (the
    /// forward's mask, [`Backend::dropout`] on the gradient). The provided version makes the
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

    // ---- position, attention, activation ------------------------------

    /// Rotates `x` in place by RoPE.
    fn rope_forward(
        &self,
        shape: &RopeShape,
        x: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
    /// [`Backend::rope_forward`] on `x`, then [`Backend::copy_row_groups`] from `copy_from`
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
    /// The backward of RoPE, in place on the gradient (the inverse rotation).
    fn rope_backward(
        &self,
        shape: &RopeShape,
        dx: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
    /// `out = softmax(q·kᵀ·scale, masked by mask)·v`; saves the log-sum-exp
    /// per (batch, head, query) in `lse` (from [`Backend::zeros_f32`]) for the
    /// backward. A query that may see no key gets zeros.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        shape: &AttentionShape,
        mask: &AttentionMask,
        q: Slice<'_, Self::Buffer>,
        k: Slice<'_, Self::Buffer>,
        v: Slice<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
        lse: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
    /// Writes the gradients of `q`, `k` and `v` into `grads` (whatever was
    /// there), each laid out like its input (the shape's strides) from its
    /// offset in `at`: for a fused qkv input, one `[tokens, 3·C]` gradient,
    /// which the fused projection's weight and input gradients take in one
    /// GEMM each. Elements of `grads` outside the three are left alone.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        shape: &AttentionShape,
        mask: &AttentionMask,
        dout: Slice<'_, Self::Buffer>,
        q: Slice<'_, Self::Buffer>,
        k: Slice<'_, Self::Buffer>,
        v: Slice<'_, Self::Buffer>,
        out: Slice<'_, Self::Buffer>,
        lse: Slice<'_, Self::Buffer>,
        grads: SliceMut<'_, Self::Buffer>,
        at: QkvOffsets,
    ) -> Result<(), Self::Error>;
    /// `out = gelu_tanh(x)` over `len` elements.
    fn gelu_forward(
        &self,
        x: Slice<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// `x[rows, cols] += bias[cols]`, then `out = gelu_tanh(x)`: the MLP's first activation
    /// (`x` keeps the pre-activation for the backward). The provided version calls
    /// [`Backend::bias_add`] and [`Backend::gelu_forward`]; a backend may fuse them.
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

    // ---- embeddings and loss -------------------------------------------

    /// `out[i, :] = table[ids[i], :]` for `rows` ids (learned positions use ids `0..T`).
    fn embedding_forward(
        &self,
        ids: &Self::Ids,
        table: Slice<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
        rows: usize,
        channels: usize,
    ) -> Result<(), Self::Error>;
    /// `dtable[ids[i], :] += dout[i, :]`.
    fn embedding_backward(
        &self,
        ids: &Self::Ids,
        dout: Slice<'_, Self::Buffer>,
        dtable: SliceMut<'_, Self::Buffer>,
        rows: usize,
        channels: usize,
    ) -> Result<(), Self::Error>;
    /// Fused weighted softmax cross-entropy, forward and backward in one:
    /// for each row with `weights[r] ≠ 0`, `losses[r] = weights[r] · (−log softmax(logits[r])[targets[r]])`
    /// and `logits[r]` is overwritten by `grad_scale · weights[r] · (softmax − onehot)`;
    /// rows with weight 0 get loss 0 and gradient 0. Weights carry the NELBO
    /// `1/t` and the normalisation; `grad_scale` the loss scaling. The class
    /// `excluded` (SUBS: the model never predicts `[MASK]`) is left out of the
    /// softmax and gets gradient 0. `shape` is `[rows, vocab]` with its row stride (the
    /// padding between rows is neither read nor written).
    #[allow(clippy::too_many_arguments)]
    fn softmax_cross_entropy(
        &self,
        logits: SliceMut<'_, Self::Buffer>,
        targets: &Self::Ids,
        weights: Slice<'_, Self::Buffer>,
        losses: SliceMut<'_, Self::Buffer>,
        shape: RowMajor,
        excluded: Option<u32>,
        grad_scale: f32,
    ) -> Result<(), Self::Error>;

    // ---- optimisation ---------------------------------------------------

    /// `Σ x` over `len` elements, in f64 (the loss of a batch from its per-row losses).
    fn sum(&self, x: Slice<'_, Self::Buffer>, len: usize) -> Result<f64, Self::Error>;
    /// `Σ x²` over `len` elements, in f64 (for the gradient norm).
    fn sum_squares(&self, x: Slice<'_, Self::Buffer>, len: usize) -> Result<f64, Self::Error>;
    /// `x *= factor` over `len` elements (gradient clipping).
    fn scale(
        &self,
        x: SliceMut<'_, Self::Buffer>,
        len: usize,
        factor: f32,
    ) -> Result<(), Self::Error>;
    /// One AdamW step over `len` parameters with moments `m`, `v`.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        hp: &AdamW,
        params: SliceMut<'_, Self::Buffer>,
        grads: Slice<'_, Self::Buffer>,
        m: SliceMut<'_, Self::Buffer>,
        v: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// `ema = decay·ema + (1 − decay)·params`.
    fn ema_update(
        &self,
        ema: SliceMut<'_, Self::Buffer>,
        params: Slice<'_, Self::Buffer>,
        len: usize,
        decay: f32,
    ) -> Result<(), Self::Error>;

    /// One optimizer update over `len` parameters: the gradients times `step.grad_scale`,
    /// AdamW on `params.master` with the f32 moments `m`, `v`, then the EMA's master
    /// `ema = decay·ema + (1 − decay)·params` at `step.ema_decay`, and the storage copies of
    /// both rewritten from their masters. `grads` is left unspecified (scaled or not). A GPU
    /// backend does it all in one pass over the parameters. Provided: [`Backend::scale`],
    /// [`Backend::adamw`], [`Backend::ema_update`] and [`Backend::round_into`].
    ///
    /// ```
    /// use did_core::backend::{AdamW, Backend, OptimizerStep, Slice, SliceMut, UpdatedWeights};
    /// fn update<B: Backend>(
    ///     be: &B, params: &mut B::Buffer, grads: &mut B::Buffer, m: &mut B::Buffer,
    ///     v: &mut B::Buffer, len: usize,
    /// ) -> Result<(), B::Error> {
    ///     let step = OptimizerStep { adamw: AdamW::default(), grad_scale: 1.0, ema_decay: None };
    ///     let params = UpdatedWeights { master: SliceMut::whole(params), rounded: None };
    ///     be.optimizer_step(&step, params, SliceMut::whole(grads), SliceMut::whole(m),
    ///         SliceMut::whole(v), None, len)
    /// }
    /// ```
    #[allow(clippy::too_many_arguments)]
    fn optimizer_step(
        &self,
        step: &OptimizerStep,
        params: UpdatedWeights<'_, Self::Buffer>,
        grads: SliceMut<'_, Self::Buffer>,
        m: SliceMut<'_, Self::Buffer>,
        v: SliceMut<'_, Self::Buffer>,
        ema: Option<UpdatedWeights<'_, Self::Buffer>>,
        len: usize,
    ) -> Result<(), Self::Error> {
        let (grads_buf, grads_at) = (grads.buf, grads.offset);
        if step.grad_scale != 1.0 {
            self.scale(
                SliceMut::at(&mut *grads_buf, grads_at),
                len,
                step.grad_scale,
            )?;
        }
        let (master, master_at) = (params.master.buf, params.master.offset);
        self.adamw(
            &step.adamw,
            SliceMut::at(&mut *master, master_at),
            Slice::at(&*grads_buf, grads_at),
            m,
            v,
            len,
        )?;
        if let Some(rounded) = params.rounded {
            self.round_into(Slice::at(&*master, master_at), rounded, len)?;
        }
        if let (Some(ema), Some(decay)) = (ema, step.ema_decay) {
            let (ema_master, ema_at) = (ema.master.buf, ema.master.offset);
            self.ema_update(
                SliceMut::at(&mut *ema_master, ema_at),
                Slice::at(&*master, master_at),
                len,
                decay,
            )?;
            if let Some(rounded) = ema.rounded {
                self.round_into(Slice::at(&*ema_master, ema_at), rounded, len)?;
            }
        }
        Ok(())
    }

    // ---- sampling --------------------------------------------------------

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
