//! The host side of `kernels/attention.cu` and the `rope` kernel of `kernels/norm.cu`:
//! [`AttentionOps`] on the reference and flash kernels.

use cudarc::driver::DevicePtr;
use did_core::backend::prelude::*;
use did_core::backend::{AttentionShape, QkvOffsets, RopeShape, Slice, SliceMut};
use did_core::mask::AttentionMask;

use crate::buffer::*;
use crate::device::*;
use crate::kernel::{AttentionShapeC, Kernel, MaskArgs};
use crate::launch::*;
use crate::{key_split, CudaError};

/// Largest head dimension the attention kernels hold in registers.
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// The head dimension the flash kernel is written for.
pub(crate) const FLASH_HEAD_DIM: usize = 64;

/// The attention forward's arguments, shared by the reference and flash kernels.
#[derive(Clone, Copy)]
pub(crate) struct ForwardArgs {
    s: AttentionShapeC,
    mask: MaskArgs,
    scale: f32,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
}

impl AttentionOps for CudaBackend {
    fn rope_forward(
        &self,
        shape: &RopeShape,
        x: SliceMut<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        self.rope(shape, x, false)
    }
    fn rope_backward(
        &self,
        shape: &RopeShape,
        dx: SliceMut<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        self.rope(shape, dx, true)
    }
    fn attention_forward(
        &self,
        s: &AttentionShape,
        mask: &AttentionMask,
        q: Slice<'_, CudaBuffer>,
        k: Slice<'_, CudaBuffer>,
        v: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        lse: SliceMut<'_, CudaBuffer>,
    ) -> Result<(), CudaError> {
        let e = attention_extents(s)?;
        let a = ForwardArgs {
            s: shape_c(s),
            mask: mask_args(mask),
            scale: s.scale,
            q: self.ptr(q, e.q, "attention q")?,
            k: self.ptr(k, e.k, "attention k")?,
            v: self.ptr(v, e.v, "attention v")?,
            out: self.ptr_mut(out, e.out, "attention out")?,
            lse: self.f32_ptr(lse.buf, lse.offset, e.lse, "attention lse")?,
        };
        if let Some(heads) = self.flash_heads(s) {
            if heads == 0 || s.q_len == 0 {
                return Ok(());
            }
            return self.attention_forward_flash(s, heads, a, e.lse);
        }
        self.warps(e.lse)
            .attention_forward(a.s, a.mask, a.scale, a.q, a.k, a.v, a.out, a.lse)
    }
    fn attention_backward(
        &self,
        s: &AttentionShape,
        mask: &AttentionMask,
        dout: Slice<'_, CudaBuffer>,
        q: Slice<'_, CudaBuffer>,
        k: Slice<'_, CudaBuffer>,
        v: Slice<'_, CudaBuffer>,
        out: Slice<'_, CudaBuffer>,
        lse: Slice<'_, CudaBuffer>,
        grads: SliceMut<'_, CudaBuffer>,
        at: QkvOffsets,
    ) -> Result<(), CudaError> {
        let e = attention_extents(s)?;
        let (dp, qp, kp, vp) = (
            self.ptr(dout, e.out, "attention dout")?,
            self.ptr(q, e.q, "attention q")?,
            self.ptr(k, e.k, "attention k")?,
            self.ptr(v, e.v, "attention v")?,
        );
        let (op_, lp) = (
            self.ptr(out, e.out, "attention out")?,
            self.f32_ptr(lse.buf, lse.offset, e.lse, "attention lse")?,
        );
        // Each gradient laid out like its input, from its offset in `grads`.
        let gp = self.ptr_mut(grads, at.span(&e), "attention gradients")?;
        let elem = self.precision.bytes() as u64;
        let (dqp, dkp, dvp) = (
            gp + elem * at.q as u64,
            gp + elem * at.k as u64,
            gp + elem * at.v as u64,
        );
        if e.lse == 0 {
            return Ok(());
        }
        let delta = self.stream.alloc_zeros::<f32>(e.lse)?;
        let (deltap, _sync) = delta.device_ptr(&self.stream);
        let (sc, m) = (shape_c(s), mask_args(mask));
        // dQ first: it writes the δ the dK/dV pass reads.
        let (dq_kernel, dkv_kernel, dq_launch, dkv_launch) = match self.flash_heads(s) {
            Some(heads) => (
                Kernel::AttentionBackwardFlashDq,
                Kernel::AttentionBackwardFlashDkv,
                self.grid((heads, flash_tiles(s.q_len)?, 1), 128),
                // No keys, no key gradients (and a grid of zero rows is a launch error).
                (s.kv_len > 0)
                    .then(|| flash_tiles(s.kv_len).map(|t| self.grid((heads, t, 1), 128)))
                    .transpose()?,
            ),
            None => (
                Kernel::AttentionBackwardDq,
                Kernel::AttentionBackwardDkv,
                self.warps(e.lse),
                Some(self.warps(s.batch * s.heads * s.kv_len)),
            ),
        };
        dq_launch.attention_backward_dq(
            dq_kernel, sc, m, s.scale, dp, qp, kp, vp, op_, lp, dqp, deltap,
        )?;
        match dkv_launch {
            Some(l) => l.attention_backward_dkv(
                dkv_kernel, sc, m, s.scale, dp, qp, kp, vp, lp, deltap, dkp, dvp,
            ),
            None => Ok(()),
        }
    }
}

/// The flash kernels' grid height: one block per 64 rows.
pub(crate) fn flash_tiles(rows: usize) -> Result<u32, CudaError> {
    flash_blocks(rows, 64)
}

/// One block per `per_block` rows, in a grid's y dimension (at most 65,535).
pub(crate) fn flash_blocks(rows: usize, per_block: usize) -> Result<u32, CudaError> {
    u32::try_from(rows.div_ceil(per_block))
        .ok()
        .filter(|&tiles| tiles <= 65_535)
        .ok_or_else(|| {
            CudaError::Shape(format!("attention: {rows} rows is too many for one launch"))
        })
}

pub(crate) fn attention_extents(
    s: &AttentionShape,
) -> Result<did_core::backend::AttentionExtents, CudaError> {
    if s.head_dim > MAX_HEAD_DIM {
        return Err(CudaError::Shape(format!(
            "attention: head_dim {} exceeds the {MAX_HEAD_DIM} the kernels hold in registers",
            s.head_dim
        )));
    }
    s.extents().map_err(CudaError::Shape)
}

pub(crate) fn shape_c(s: &AttentionShape) -> AttentionShapeC {
    AttentionShapeC {
        batch: s.batch as i64,
        heads: s.heads as i64,
        head_dim: s.head_dim as i64,
        q_len: s.q_len as i64,
        kv_len: s.kv_len as i64,
        q_stride: s.q_stride as i64,
        k_stride: s.k_stride as i64,
        v_stride: s.v_stride as i64,
        q_batch_stride: s.q_batch_stride as i64,
        kv_batch_stride: s.kv_batch_stride as i64,
    }
}

impl CudaBackend {
    /// `Some(sequences × heads)`, the flash kernels' grid width (their tiles of rows are the
    /// height, at most 65,535), where they compute this attention; `None` where the reference
    /// kernels do. The flash kernels keep the running maximum of the unscaled scores, which is
    /// the scaled scores' only for a positive scale.
    pub(crate) fn flash_heads(&self, s: &AttentionShape) -> Option<u32> {
        let heads = s.batch * s.heads;
        (self.attention_kernel() == AttentionKernel::Flash
            && s.scale > 0.0
            && s.scale.is_finite()
            && s.head_dim == FLASH_HEAD_DIM
            && heads < i32::MAX as usize
            && s.q_len.div_ceil(64) <= 65_535
            && s.kv_len.div_ceil(64) <= 65_535)
            .then_some(heads as u32)
    }

    /// The flash forward over `heads` (sequences × heads) grid rows, its key tiles split between
    /// blocks where the launch alone would leave the GPU idle (module [`key_split`]): then the
    /// blocks write f32 partials and `attention_combine_splits` joins them into `out` and `lse`.
    pub(crate) fn attention_forward_flash(
        &self,
        s: &AttentionShape,
        heads: u32,
        a: ForwardArgs,
        rows: usize,
    ) -> Result<(), CudaError> {
        // Warps of 16 query rows, up to four a block: a draft's few queries take one warp.
        let warps = s.q_len.div_ceil(16).min(4);
        let query_blocks = flash_blocks(s.q_len, 16 * warps)?;
        let grid = (heads, query_blocks, 1);
        let tiles = s.kv_len.div_ceil(64).max(1);
        let blocks = query_blocks as usize * heads as usize;
        let per = key_split::tiles_per_split(blocks, tiles, self.sms, self.key_split());
        let splits = tiles.div_ceil(per);
        let threads = 32 * warps as u32;
        let per = per as i32;
        if splits == 1 {
            return self.grid(grid, threads).attention_forward_flash(
                a.s, a.mask, a.scale, a.q, a.k, a.v, a.out, a.lse, per, 0, 0,
            );
        }
        // SAFETY: uninitialised f32s; every split writes every element of its rows (an empty
        // split writes zeros and −∞), and the combine reads only those.
        let partial_out = unsafe { self.stream.alloc::<f32>(splits * rows * FLASH_HEAD_DIM) }?;
        // SAFETY: as above.
        let partial_lse = unsafe { self.stream.alloc::<f32>(splits * rows) }?;
        let (po, _po_sync) = partial_out.device_ptr(&self.stream);
        let (pl, _pl_sync) = partial_lse.device_ptr(&self.stream);
        // The outputs go to the combine; the forward writes only partials.
        self.grid((grid.0, grid.1, splits as u32), threads)
            .attention_forward_flash(a.s, a.mask, a.scale, a.q, a.k, a.v, 0, 0, per, po, pl)?;
        self.warps(rows)
            .attention_combine_splits(a.s, splits as i32, po, pl, a.out, a.lse)
    }

    /// The `rope` kernel on `x`; with `copy` = (columns from, columns, destination, destination
    /// row stride, destination sequence stride), also the copy of those columns of every row,
    /// as rotated (`rope_forward_and_copy`).
    pub(crate) fn rope(
        &self,
        s: &RopeShape,
        x: SliceMut<'_, CudaBuffer>,
        inverse: bool,
    ) -> Result<(), CudaError> {
        let p = self.ptr_mut(x, s.extent(), "rope x")?;
        self.rope_at(s, p, inverse, None)
    }

    pub(crate) fn rope_at(
        &self,
        s: &RopeShape,
        p: u64,
        inverse: bool,
        copy: Option<(usize, usize, u64, usize, usize)>,
    ) -> Result<(), CudaError> {
        let half = s.head_dim / 2;
        // Sequences a thread rotates with one angle: as many as keep ≈ 128 k threads busy.
        let per = (s.batch * s.tokens * s.heads * half / (1 << 17)).clamp(1, s.batch.max(1));
        let (col0, cols, dst, dst_stride, dst_batch_stride) = copy.unwrap_or((0, 0, 0, 0, 0));
        // The columns the rotation does not reach are copied by threads of their own.
        let plain = (col0 + cols).saturating_sub(col0.max(s.heads * s.head_dim));
        self.elements(
            s.batch.div_ceil(per) * s.tokens * s.heads * half + s.batch * s.tokens * plain,
        )
        .rope(
            p,
            s.batch as i64,
            s.tokens as i64,
            s.heads as i64,
            s.head_dim as i64,
            s.stride as i64,
            s.batch_stride as i64,
            s.position_offset as i64,
            f64::from(s.base),
            inverse as i32,
            per as i64,
            dst,
            col0 as i64,
            cols as i64,
            dst_stride as i64,
            dst_batch_stride as i64,
        )
    }
}
