//! Launching kernels: device pointers checked against their buffers, grid sizes, and the
//! argument lists the kernels take.

use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use did_core::backend::{DropoutMask, Slice, SliceMut};
use did_core::mask::AttentionMask;

use crate::buffer::*;
use crate::counters::Event;
use crate::device::*;
use crate::ops::attention::*;
use crate::{kernels, CudaError};

/// Threads per block of the element-wise and row kernels.
pub(crate) const THREADS: u32 = 256;

/// Threads per block of `embedding_backward` (two channels each).
pub(crate) const EMBEDDING_THREADS: u32 = 64;

/// Rows per partial sum of the deterministic column sums.
pub(crate) const ROWS_PER_CHUNK: usize = 64;

/// Threads per block of `draw_tokens` (its `DRAW_THREADS`).
pub(crate) const DRAW_THREADS: u32 = 512;

/// Threads per block of `colsum_partial` (32 columns × its `COLSUM_SLICES` row slices).
pub(crate) const COLSUM_THREADS: u32 = 256;

/// One kernel argument.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I64(i64),
    I32(i32),
    U32(u32),
    F32(f32),
    F64(f64),
    Attention(AttentionShapeC),
}

pub(crate) fn mask_args(mask: &AttentionMask) -> [Arg; 5] {
    let window = |w: Option<usize>| w.map_or(-1, |w| w.min(i64::MAX as usize) as i64);
    let (kind, p0, p1, p2, win) = match *mask {
        AttentionMask::Bd3Training {
            seq_len,
            block_size,
        } => (0, seq_len, block_size, 0, -1),
        AttentionMask::BlockCausal {
            block_size,
            query_offset,
            key_offset,
            window: w,
        } => (1, block_size, query_offset, key_offset, window(w)),
        AttentionMask::Full => (2, 0, 0, 0, -1),
        AttentionMask::Causal {
            query_offset,
            key_offset,
            window: w,
        } => (3, 0, query_offset, key_offset, window(w)),
    };
    [
        Arg::I32(kind),
        Arg::I64(p0 as i64),
        Arg::I64(p1 as i64),
        Arg::I64(p2 as i64),
        Arg::I64(win),
    ]
}

pub(crate) fn check_ids(ids: &[u32], table_rows: usize) -> Result<(), CudaError> {
    match did_core::backend::first_id_outside(ids, table_rows) {
        Some((row, id)) => Err(CudaError::TokenOutOfRange {
            id,
            row,
            rows: table_rows,
        }),
        None => Ok(()),
    }
}

/// The kernels' `DROPOUT_ARGS` (kernels/elementwise.cu): p, keep scale, the stream's key, step
/// and tag; p = 0 (no dropout) for `None`. A mask draws one word an element from one stream row.
pub(crate) fn dropout_args(
    dropout: Option<DropoutMask>,
    len: usize,
) -> Result<[Arg; 6], CudaError> {
    let Some(d) = dropout.filter(|d| d.p > 0.0) else {
        return Ok([
            Arg::F32(0.0),
            Arg::F32(0.0),
            Arg::U32(0),
            Arg::U32(0),
            Arg::U32(0),
            Arg::U32(0),
        ]);
    };
    if len > u32::MAX as usize {
        return Err(CudaError::Shape(format!(
            "dropout over {len} elements exceeds the 2³² draws of one stream row"
        )));
    }
    let (key, step, tag) = d.stream.counter_parts();
    Ok([
        Arg::F32(d.p),
        Arg::F32(d.keep_scale()),
        Arg::U32(key[0]),
        Arg::U32(key[1]),
        Arg::U32(step),
        Arg::U32(tag),
    ])
}

/// A grid's x dimension, one block a row: at most 2³¹ − 1.
pub(crate) fn grid_rows(rows: usize) -> Result<u32, CudaError> {
    i32::try_from(rows)
        .map(|r| r as u32)
        .map_err(|_| CudaError::Shape(format!("{rows} rows exceed one grid")))
}

impl CudaBackend {
    pub(crate) fn launch(
        &self,
        kernel: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        let f = self
            .functions
            .get(kernel)
            .ok_or_else(|| CudaError::Shape(format!("kernel {kernel} is not loaded")))?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
                Arg::Attention(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every pointer argument was bounds-checked against its
        // buffer by the caller, and the arguments match the kernel's signature.
        unsafe { b.launch(cfg) }?;
        self.counters.add(Event::Kernel, 1);
        Ok(())
    }

    /// A grid-stride launch over `n` elements.
    pub(crate) fn launch_elements(
        &self,
        kernel: &'static str,
        n: usize,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        // A chunked kernel's thread takes 16 bytes of each operand (kernels.rs, CHUNKED).
        let threads = if kernels::CHUNKED.contains(&kernel) {
            let chunk = match self.precision {
                Precision::F32 => 4,
                Precision::Bf16 => 8,
            };
            n.div_ceil(chunk)
        } else {
            n
        };
        let blocks = threads.div_ceil(THREADS as usize).min(1 << 16) as u32;
        self.launch(kernel, (blocks, 1, 1), THREADS, args)
    }

    /// A launch with one warp per item, four warps per block.
    pub(crate) fn launch_warps(
        &self,
        kernel: &'static str,
        warps: usize,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        if warps == 0 {
            return Ok(());
        }
        // A grid's x dimension holds 2³¹ − 1 blocks.
        let blocks = i32::try_from(warps.div_ceil(4))
            .map_err(|_| CudaError::Shape(format!("{kernel}: {warps} warps exceed one grid")))?
            as u32;
        self.launch(kernel, (blocks, 1, 1), 128, args)
    }

    pub(crate) fn device_ptr(
        &self,
        buf: &CudaBuffer,
        offset: usize,
        len: usize,
        what: &'static str,
    ) -> Result<u64, CudaError> {
        let end = offset.checked_add(len).ok_or(CudaError::OutOfBounds {
            what,
            start: offset,
            end: usize::MAX,
            len: buf.len,
        })?;
        if end > buf.len {
            return Err(CudaError::OutOfBounds {
                what,
                start: offset,
                end,
                len: buf.len,
            });
        }
        let (p, _sync) = buf.mem.device_ptr(&self.stream);
        Ok(p + (offset * element_bytes(buf)) as u64)
    }

    /// A tensor in the storage precision, `len` elements from the slice's offset.
    pub(crate) fn ptr(
        &self,
        s: Slice<'_, CudaBuffer>,
        len: usize,
        what: &'static str,
    ) -> Result<u64, CudaError> {
        self.check_stored(s.buf, what)?;
        self.device_ptr(s.buf, s.offset, len, what)
    }

    pub(crate) fn ptr_mut(
        &self,
        s: SliceMut<'_, CudaBuffer>,
        len: usize,
        what: &'static str,
    ) -> Result<u64, CudaError> {
        self.check_stored(s.buf, what)?;
        self.device_ptr(s.buf, s.offset, len, what)
    }

    /// A kernel reading `store_t` must not get a bf16 backend's f32 buffer.
    pub(crate) fn check_stored(
        &self,
        buf: &CudaBuffer,
        what: &'static str,
    ) -> Result<(), CudaError> {
        if buf.f32 && self.precision == Precision::Bf16 {
            return Err(CudaError::Shape(format!(
                "{what}: an f32 buffer (from zeros_f32) where a bf16 tensor is expected"
            )));
        }
        Ok(())
    }

    /// An f32 buffer (the attention's log-sum-exp): from [`MemoryOps::zeros_f32`](did_core::backend::MemoryOps::zeros_f32).
    pub(crate) fn f32_ptr(
        &self,
        buf: &CudaBuffer,
        offset: usize,
        len: usize,
        what: &'static str,
    ) -> Result<u64, CudaError> {
        if !buf.f32 {
            return Err(CudaError::Shape(format!(
                "{what}: needs a buffer from zeros_f32 (this backend keeps the attention's \
                 log-sum-exp in f32; a bf16 buffer was given)"
            )));
        }
        self.device_ptr(buf, offset, len, what)
    }

    pub(crate) fn ids_ptr(
        &self,
        ids: &CudaIds,
        rows: usize,
        what: &'static str,
    ) -> Result<u64, CudaError> {
        if rows > ids.host.len() {
            return Err(CudaError::OutOfBounds {
                what,
                start: 0,
                end: rows,
                len: ids.host.len(),
            });
        }
        let (p, _sync) = ids.dev.device_ptr(&self.stream);
        Ok(p)
    }

    /// `out[g, c] += Σ_rows a[g, r, c]·b[g, r, c]` (`b = 1` when absent) in a fixed order, for
    /// each of `groups` consecutive `[rows, cols]` blocks (per-sequence sums: one launch for the
    /// batch instead of one per sequence).
    /// A per-sequence gate's device pointer, or null (the kernels' "gate 1") without one.
    pub(crate) fn gate_ptr(
        &self,
        gate: Option<Slice<'_, CudaBuffer>>,
        batch: usize,
        channels: usize,
    ) -> Result<u64, CudaError> {
        gate.map_or(Ok(0), |g| self.ptr(g, batch * channels, "gate"))
    }
}

#[cfg(test)]
mod launch_constants {
    use super::*;
    use crate::{few_rows, kernels};

    /// The value of `#define NAME value` in a kernel source.
    fn define(file: &str, name: &str) -> u32 {
        let (_, text) = kernels::SOURCES
            .iter()
            .find(|(f, _)| *f == file)
            .unwrap_or_else(|| panic!("no kernel source {file}"));
        let prefix = format!("#define {name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{file} defines no number {name}"))
    }

    /// Kernels that size shared arrays or strides by a block size the host launches with: a
    /// change on one side only would compute wrong sums without any error.
    #[test]
    fn host_launch_sizes_are_the_kernels_block_sizes() {
        assert_eq!(define("linear.cu", "FEW_THREADS"), few_rows::THREADS);
        assert_eq!(
            define("linear.cu", "FEW_COLS") as usize,
            few_rows::COLUMNS_PER_BLOCK
        );
        assert_eq!(define("sample.cu", "DRAW_THREADS"), DRAW_THREADS);
        assert_eq!(define("elementwise.cu", "SUM_THREADS"), THREADS);
        assert_eq!(
            32 * define("elementwise.cu", "COLSUM_SLICES"),
            COLSUM_THREADS
        );
    }
}
