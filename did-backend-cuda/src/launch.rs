//! Launching kernels: device pointers checked against their buffers, grid sizes, and the
//! argument lists the kernels take.

use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use did_core::backend::{DropoutMask, Slice, SliceMut};
use did_core::mask::AttentionMask;

use crate::buffer::*;
use crate::counters::Event;
use crate::device::*;
use crate::kernel::AttentionShapeC;
use crate::kernel::{DropoutArgs, Kernel, MaskArgs};
use crate::CudaError;

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

/// One kernel argument, as it is pushed to the driver.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I64(i64),
    I32(i32),
    U32(u32),
    F32(f32),
    F64(f64),
    Shape(AttentionShapeC),
}

/// The most arguments a kernel takes (`optimizer_step`: 17).
pub(crate) const MAX_ARGS: usize = 24;

/// A launch's argument list, on the stack.
pub(crate) struct Args {
    items: [Arg; MAX_ARGS],
    len: usize,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            items: [Arg::Ptr(0); MAX_ARGS],
            len: 0,
        }
    }
}

impl Args {
    pub(crate) fn push(&mut self, arg: Arg) {
        // Every kernel's list fits (kernel/signatures.rs checks them against MAX_ARGS).
        self.items[self.len] = arg;
        self.len += 1;
    }

    pub(crate) fn as_slice(&self) -> &[Arg] {
        &self.items[..self.len]
    }
}

/// How a launch's grid is sized.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dims {
    /// A grid and a block of threads, as given.
    Grid { grid: (u32, u32, u32), block: u32 },
    /// A grid-stride loop over `n` elements (chunks of 16 bytes for a chunked kernel).
    Elements(usize),
    /// One warp an item, four warps a block.
    Warps(usize),
}

/// A launch about to happen: the backend and the grid. Its methods, one a kernel (generated
/// from the table in kernel.rs), take the kernel's arguments by name and type.
pub(crate) struct Launch<'a> {
    backend: &'a CudaBackend,
    dims: Dims,
}

/// The mask as the attention kernels take it (`kind`, then its parameters).
pub(crate) fn mask_args(mask: &AttentionMask) -> MaskArgs {
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
    MaskArgs {
        kind,
        p0: p0 as i64,
        p1: p1 as i64,
        p2: p2 as i64,
        window: win,
    }
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
) -> Result<DropoutArgs, CudaError> {
    let Some(d) = dropout.filter(|d| d.p > 0.0) else {
        return Ok(DropoutArgs::default());
    };
    if len > u32::MAX as usize {
        return Err(CudaError::Shape(format!(
            "dropout over {len} elements exceeds the 2³² draws of one stream row"
        )));
    }
    let (key, step, tag) = d.stream.counter_parts();
    Ok(DropoutArgs {
        p: d.p,
        keep_scale: d.keep_scale(),
        key0: key[0],
        key1: key[1],
        step,
        tag,
    })
}

/// A grid's x dimension, one block a row: at most 2³¹ − 1.
pub(crate) fn grid_rows(rows: usize) -> Result<u32, CudaError> {
    i32::try_from(rows)
        .map(|r| r as u32)
        .map_err(|_| CudaError::Shape(format!("{rows} rows exceed one grid")))
}

impl CudaBackend {
    /// A launch of `grid` blocks of `block` threads.
    pub(crate) fn grid(&self, grid: (u32, u32, u32), block: u32) -> Launch<'_> {
        self.launch_with(Dims::Grid { grid, block })
    }

    /// A grid-stride launch over `n` elements (none for `n = 0`).
    pub(crate) fn elements(&self, n: usize) -> Launch<'_> {
        self.launch_with(Dims::Elements(n))
    }

    /// A launch with one warp per item, four warps a block (none for no items).
    pub(crate) fn warps(&self, items: usize) -> Launch<'_> {
        self.launch_with(Dims::Warps(items))
    }

    fn launch_with(&self, dims: Dims) -> Launch<'_> {
        Launch {
            backend: self,
            dims,
        }
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

impl Launch<'_> {
    /// Launches `kernel` with `args`, which its typed launcher built (kernel.rs).
    pub(crate) fn run(self, kernel: Kernel, args: &[Arg]) -> Result<(), CudaError> {
        let be = self.backend;
        let (grid, block) = match self.dims {
            Dims::Grid { grid, block } => (grid, block),
            Dims::Elements(0) | Dims::Warps(0) => return Ok(()),
            Dims::Elements(n) => {
                // A chunked kernel's thread takes 16 bytes of each operand.
                let threads = if kernel.chunked() {
                    n.div_ceil(16 / be.precision.bytes())
                } else {
                    n
                };
                let blocks = threads.div_ceil(THREADS as usize).min(1 << 16) as u32;
                ((blocks, 1, 1), THREADS)
            }
            Dims::Warps(warps) => {
                // A grid's x dimension holds 2³¹ − 1 blocks.
                let blocks = i32::try_from(warps.div_ceil(4)).map_err(|_| {
                    CudaError::Shape(format!("{}: {warps} warps exceed one grid", kernel.name()))
                })?;
                ((blocks as u32, 1, 1), 128)
            }
        };
        let f = be
            .functions
            .get(&kernel)
            .ok_or_else(|| CudaError::Shape(format!("kernel {} is not loaded", kernel.name())))?;
        let mut b = be.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
                Arg::Shape(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every pointer argument was bounds-checked against its buffer by the caller,
        // and the arguments are the kernel's parameters in order and type (the launcher's
        // list, checked against the source by kernel/signatures.rs).
        unsafe { b.launch(cfg) }?;
        be.counters.add(Event::Kernel, 1);
        Ok(())
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
