//! Rotary position embedding and attention under a block mask, forward and backward.

use super::{MemoryOps, Slice, SliceMut};
use crate::mask::AttentionMask;

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

/// Where [`AttentionOps::attention_backward`] puts the gradients of `q`, `k` and `v`
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

/// Rotary embedding and masked attention.
///
/// ```
/// use did_core::backend::{AttentionOps, RopeShape, SliceMut};
/// fn rotate<B: AttentionOps>(be: &B, shape: &RopeShape, qk: SliceMut<'_, B::Buffer>) -> Result<(), B::Error> {
///     be.rope_forward(shape, qk)
/// }
/// ```
pub trait AttentionOps: MemoryOps {
    /// Rotates `x` in place by RoPE.
    fn rope_forward(
        &self,
        shape: &RopeShape,
        x: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
    /// The backward of RoPE, in place on the gradient (the inverse rotation).
    fn rope_backward(
        &self,
        shape: &RopeShape,
        dx: SliceMut<'_, Self::Buffer>,
    ) -> Result<(), Self::Error>;
    /// `out = softmax(q·kᵀ·scale, masked by mask)·v`; saves the log-sum-exp
    /// per (batch, head, query) in `lse` (from [`MemoryOps::zeros_f32`](crate::backend::MemoryOps::zeros_f32)) for the
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
}
