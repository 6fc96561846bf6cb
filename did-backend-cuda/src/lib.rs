//! # did-backend-cuda
//!
//! The CUDA backend: every [`Backend`] op on an NVIDIA GPU through cudarc,
//! with kernels compiled at run time by NVRTC for the device (once per
//! process, [`kernels`]) and matmuls through cuBLAS strided-batched GEMM.
//!
//! - **Two precisions** ([`Precision`]): `F32` (every buffer f32, TF32 off:
//!   checked against the CPU backend at rtol ≈ 1e-4) and `Bf16` (buffers
//!   stored as bf16, all arithmetic and GEMM accumulation in f32).
//! - **Deterministic**: reductions go in a fixed order and no float is
//!   accumulated with atomics (the token-drawing kernel adds integers, whose
//!   sum does not depend on order), so the same seed gives bit-identical
//!   results run after run on the same GPU.
//! - **Dynamic loading**: the crate builds with no CUDA installed. Without the
//!   libraries or a device, [`CudaBackend::new`] returns
//!   [`CudaError::Unavailable`] naming what is missing; [`cuda_available`]
//!   asks first without touching a missing library.
//!
//! ```
//! use did_backend_cuda::{cuda_available, CudaBackend, Precision};
//! use did_core::backend::prelude::*;
//! use did_core::backend::{Gemm, Slice, SliceMut};
//! if !cuda_available() {
//!     return Ok(()); // this machine has no GPU
//! }
//! let gpu = CudaBackend::new(0, Precision::F32)?;
//! let x = gpu.upload(&[1.0, 2.0, 3.0, 4.0])?; // [2, 2]
//! let w = gpu.upload(&[1.0, 0.0, 0.0, 1.0])?; // identity, [out, in]
//! let mut y = gpu.zeros(4)?;
//! gpu.matmul(&Gemm::linear(2, 2, 2), Slice::whole(&x), Slice::whole(&w), SliceMut::whole(&mut y))?;
//! let mut host = [0.0; 4];
//! gpu.download(Slice::whole(&y), &mut host)?;
//! assert_eq!(host, [1.0, 2.0, 3.0, 4.0]);
//! # Ok::<(), did_backend_cuda::CudaError>(())
//! ```

#![deny(missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    HostSlice, LaunchConfig, PushKernelArg,
};
use did_core::backend::prelude::*;
use did_core::backend::{
    AdamW, AttentionShape, DropoutMask, Gemm, LinearThen, NormShape, OptimizerStep, QkvOffsets,
    RecordingId, RopeShape, RowGroups, RowMajor, Slice, SliceMut, UpdatedWeights,
};
use did_core::mask::AttentionMask;
use did_core::rng::RngStream;
use did_core::sample::categorical::{draw_token, DrawScratch, SampledToken};
use did_core::sample::nucleus::{Nucleus, NucleusRule};
use did_core::sample::DrawSpec;

use counters::{Counts, Event};

mod available;
pub mod counters;
pub mod draw;
mod error;
pub mod few_rows;
pub mod kernels;
pub mod key_split;
pub mod rows_by_id;

pub use available::{cuda_available, cuda_or_skip, probe};
pub use draw::DrawLocation;
pub use error::CudaError;
pub use key_split::KeySplit;

/// How buffers are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 storage and arithmetic, TF32 off: the parity mode.
    F32,
    /// bf16 storage, f32 arithmetic and accumulation: the speed mode.
    Bf16,
}

impl Precision {
    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

/// A device buffer of `len` floats in the backend's [`Precision`], or in f32 when it came from
/// [`MemoryOps::zeros_f32`](did_core::backend::MemoryOps::zeros_f32).
#[derive(Debug)]
pub struct CudaBuffer {
    mem: CudaSlice<u8>,
    len: usize,
    /// Elements are f32 (an f32 backend's every buffer; a bf16 backend's `zeros_f32`).
    f32: bool,
}

impl CudaBuffer {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Token ids on the device, with a host copy so that ids are checked against
/// table sizes before a kernel reads them.
#[derive(Debug)]
pub struct CudaIds {
    dev: CudaSlice<u32>,
    host: Vec<u32>,
}

/// The CUDA backend's logits rows start a multiple of this many elements apart
/// (`MemoryOps::padded_row_stride`): 50,258 → 50,304.
///
/// ```
/// assert_eq!(50_258usize.next_multiple_of(did_backend_cuda::LOGITS_ROW_ALIGNMENT), 50_304);
/// ```
pub const LOGITS_ROW_ALIGNMENT: usize = 64;

/// Threads per block of the element-wise and row kernels.
const THREADS: u32 = 256;
/// Threads per block of `embedding_backward` (two channels each).
const EMBEDDING_THREADS: u32 = 64;
/// Rows per partial sum of the deterministic column sums.
const ROWS_PER_CHUNK: usize = 64;
/// Threads per block of `draw_tokens` (its `DRAW_THREADS`).
const DRAW_THREADS: u32 = 512;
/// Threads per block of `colsum_partial` (32 columns × its `COLSUM_SLICES` row slices).
const COLSUM_THREADS: u32 = 256;
/// Largest head dimension the attention kernels hold in registers.
const MAX_HEAD_DIM: usize = 256;

/// The attention shape as the kernels read it (`struct Shape` in attention.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AttentionShapeC {
    batch: i64,
    heads: i64,
    head_dim: i64,
    q_len: i64,
    kv_len: i64,
    q_stride: i64,
    k_stride: i64,
    v_stride: i64,
    q_batch_stride: i64,
    kv_batch_stride: i64,
}
// SAFETY: plain old data with the layout of the kernel's struct.
unsafe impl DeviceRepr for AttentionShapeC {}

/// One kernel argument.
#[derive(Clone, Copy)]
enum Arg {
    Ptr(u64),
    I64(i64),
    I32(i32),
    U32(u32),
    F32(f32),
    F64(f64),
    Attention(AttentionShapeC),
}

/// Which kernels compute attention, forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One warp per query (per key in the dK/dV pass) over the pairs its mask allows, f32
    /// arithmetic: any precision, any head dimension, checked against the CPU on GPUs.
    Reference,
    /// The fused flash kernels (`attention_forward_flash`, `attention_backward_flash_dq`,
    /// `attention_backward_flash_dkv`): tensor cores, 64 × 64 tiles, empty tiles skipped. bf16
    /// storage, head dimension 64, compute capability ≥ 8.0; other shapes fall back to the
    /// reference kernels. Checked under CPU emulation (tests/emulate), by the compile gate and
    /// on an H200 (every differential test, 2026-11-28): the default wherever it can run;
    /// `DID_CUDA_ATTENTION=reference` turns it off.
    Flash,
}

/// The head dimension the flash kernel is written for.
const FLASH_HEAD_DIM: usize = 64;

/// The CUDA backend on one device.
pub struct CudaBackend {
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLAS's workspace, ours (`cublasSetWorkspace`); after `blas`, so freed after it.
    _blas_workspace: CudaSlice<u8>,
    precision: Precision,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
    device_name: String,
    /// [`AttentionKernel::Flash`] in use (an atomic: the backend is shared behind `&self`).
    flash_attention: std::sync::atomic::AtomicBool,
    /// [`DrawLocation::Device`] in use.
    draw_on_device: std::sync::atomic::AtomicBool,
    /// The flash forward's [`KeySplit`]: 0 = auto, `usize::MAX` = off, n = n tiles a block.
    key_split: std::sync::atomic::AtomicUsize,
    /// The device's streaming multiprocessors, for [`key_split::tiles_per_split`].
    sms: usize,
    /// Linear forwards over ≤ 8 rows on the few-rows kernel ([`few_rows`]) in bf16.
    few_rows: std::sync::atomic::AtomicBool,
    /// Launches, transfers and draws so far ([`CudaBackend::counts`]).
    counters: counters::Counters,
    /// Draft passes recorded as CUDA graphs ([`CudaBackend::set_graphs`]).
    graphs: std::sync::atomic::AtomicBool,
    /// The recorded graphs, by [`RecordingId`].
    recordings: std::sync::Mutex<HashMap<u64, Graph>>,
    next_recording: std::sync::atomic::AtomicU64,
    /// Why the first pass that could not be recorded failed (`DID_CUDA_STATS=1` prints it).
    first_failed_recording: std::sync::Mutex<Option<String>>,
}

/// An instantiated CUDA graph. cudarc's graph holds raw handles (not `Send`); the driver asks
/// that calls on one graph be serialised, which the backend's mutex does.
struct Graph(cudarc::driver::CudaGraph);
// SAFETY: a Graph is only touched with the backend's `recordings` lock held, one thread at a
// time, as the driver's graph thread-safety rules require.
unsafe impl Send for Graph {}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if std::env::var_os("DID_CUDA_STATS").is_some_and(|v| v == "1") {
            eprintln!("did-backend-cuda ({}): {}", self.name, self.counts());
            if let Some(why) = self.first_failed_recording() {
                eprintln!(
                    "did-backend-cuda ({}): the first pass that could not be recorded: {why}",
                    self.name
                );
            }
        }
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles every kernel for it with NVRTC and
    /// sets up cuBLAS. Fails with [`CudaError::Unavailable`] when a library
    /// or the device is missing.
    pub fn new(ordinal: usize, precision: Precision) -> Result<Self, CudaError> {
        let count = probe().map_err(CudaError::Unavailable)?;
        if ordinal >= count {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} was asked for but the driver sees {count} GPU(s) (0..{count})"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream, so cudarc's cross-stream event tracking is pure cost.
        // SAFETY: called before any allocation of this context.
        unsafe { ctx.disable_event_tracking() };
        if ctx.has_async_alloc() {
            keep_freed_memory(&ctx);
        }
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        // SAFETY: a valid handle; the default math mode keeps TF32 off.
        let status = unsafe {
            blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
        };
        status.result()?;
        let (major, minor) = ctx.compute_capability()?;
        // NVIDIA's recommended cuBLAS workspace: 32 MiB on Hopper and later, 4 MiB before (the
        // cuBLAS guide, `cublasSetWorkspace`; PyTorch sets the same for its GEMMs): the
        // algorithms cuBLAS may pick for the thin weight-gradient GEMMs (split-K) need room. Of
        // our own and fixed, so the choice does not depend on a pool's state (unmeasured).
        let workspace_bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
        let mut blas_workspace = stream.alloc_zeros::<u8>(workspace_bytes)?;
        {
            let (ptr, _sync) = blas_workspace.device_ptr_mut(&stream);
            // SAFETY: a valid handle and a device buffer of `workspace_bytes` that lives as long
            // as the handle (the field after `blas`); set after the handle's stream, whose
            // setting would reset it.
            let status = unsafe {
                blas_sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    workspace_bytes,
                )
            };
            status.result()?;
        }
        let arch = kernels::arch_for(major, minor);
        let mut functions = HashMap::new();
        for ((file, source), (file2, names)) in kernels::SOURCES.iter().zip(kernels::KERNELS) {
            debug_assert_eq!(file, &file2);
            let ptx = kernels::compile(precision, file, source, arch)?;
            let module = ctx.load_module(ptx)?;
            for &name in names {
                functions.insert(name, module.load_function(name)?);
            }
            if precision == Precision::Bf16 && major >= 8 {
                for &(_, name) in kernels::BF16_SM80_KERNELS.iter().filter(|(f, _)| f == file) {
                    functions.insert(name, module.load_function(name)?);
                }
            }
        }
        let flash = match std::env::var("DID_CUDA_ATTENTION").as_deref() {
            Ok("flash") | Err(_) => true,
            Ok("reference") => false,
            Ok(other) => {
                return Err(CudaError::Shape(format!(
                    "DID_CUDA_ATTENTION={other:?}: expected `flash` or `reference` (unset = flash \
                     wherever it can run: bf16 storage, compute capability 8.0 or later)"
                )))
            }
        };
        let draw_on_device = match std::env::var("DID_CUDA_DRAW").as_deref() {
            Ok("device") | Err(_) => true,
            Ok("host") => false,
            Ok(other) => {
                return Err(CudaError::Shape(format!(
                    "DID_CUDA_DRAW={other:?}: expected `device` or `host` (unset = device)"
                )))
            }
        };
        let key_split = match std::env::var("DID_CUDA_KEY_SPLIT").as_deref() {
            Ok("auto") | Err(_) => KeySplit::Auto,
            Ok("off") => KeySplit::Off,
            Ok(other) => match other.parse::<usize>() {
                Ok(n) if n >= 1 => KeySplit::TilesPerBlock(n),
                _ => {
                    return Err(CudaError::Shape(format!(
                        "DID_CUDA_KEY_SPLIT={other:?}: expected `auto`, `off` or a number of key \
                         tiles a block (1 or more; unset = auto)"
                    )))
                }
            },
        };
        let few_rows = match std::env::var("DID_CUDA_FEW_ROWS").as_deref() {
            Ok("on") | Err(_) => true,
            Ok("off") => false,
            Ok(other) => {
                return Err(CudaError::Shape(format!(
                    "DID_CUDA_FEW_ROWS={other:?}: expected `on` or `off` (unset = on)"
                )))
            }
        };
        let graphs = match std::env::var("DID_CUDA_GRAPHS").as_deref() {
            Ok("off") | Err(_) => false,
            Ok("on") => true,
            Ok(other) => {
                return Err(CudaError::Shape(format!(
                    "DID_CUDA_GRAPHS={other:?}: expected `on` or `off` (unset = off)"
                )))
            }
        };
        let device_name = ctx.name()?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )?
            .max(1) as usize;
        let mode = match precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        };
        Ok(CudaBackend {
            name: format!("cuda:{ordinal} {mode} ({device_name})"),
            device_name,
            _ctx: ctx,
            stream,
            blas,
            _blas_workspace: blas_workspace,
            precision,
            functions,
            flash_attention: std::sync::atomic::AtomicBool::new(false),
            draw_on_device: std::sync::atomic::AtomicBool::new(draw_on_device),
            key_split: std::sync::atomic::AtomicUsize::new(0),
            sms,
            few_rows: std::sync::atomic::AtomicBool::new(few_rows),
            counters: counters::Counters::default(),
            graphs: std::sync::atomic::AtomicBool::new(graphs),
            recordings: std::sync::Mutex::new(HashMap::new()),
            next_recording: std::sync::atomic::AtomicU64::new(0),
            first_failed_recording: std::sync::Mutex::new(None),
        })
        .inspect(|b| {
            b.set_key_split(key_split);
            // The flash kernels wherever they can run (bf16, sm_80+); an f32 backend keeps the
            // reference kernels.
            if flash {
                let _ = b.set_attention_kernel(AttentionKernel::Flash);
            }
        })
    }

    /// Chooses the attention forward kernel; [`AttentionKernel::Flash`] needs bf16 storage and
    /// compute capability ≥ 8.0.
    pub fn set_attention_kernel(&self, kernel: AttentionKernel) -> Result<(), CudaError> {
        let flash = kernel == AttentionKernel::Flash;
        if flash && !self.functions.contains_key("attention_forward_flash") {
            return Err(CudaError::Shape(format!(
                "the flash attention kernel needs bf16 storage (--precision bf16) and a GPU of compute \
                 capability 8.0 or later; this backend is {}",
                self.name
            )));
        }
        self.flash_attention
            .store(flash, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Chooses where tokens are drawn (`DID_CUDA_DRAW=device|host`; device unless told, since
    /// the H200 run of 2026-11-28 passed every check with it). Either way the tokens are those of
    /// `draw_token`.
    pub fn set_draw_location(&self, location: DrawLocation) {
        self.draw_on_device.store(
            location == DrawLocation::Device,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Chooses how the flash forward splits its key tiles between blocks ([`KeySplit::Auto`]
    /// unless told; see [`key_split`]).
    pub fn set_key_split(&self, split: KeySplit) {
        let code = match split {
            KeySplit::Auto => 0,
            KeySplit::Off => usize::MAX,
            KeySplit::TilesPerBlock(n) => n.clamp(1, usize::MAX - 1),
        };
        self.key_split
            .store(code, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether bf16 linear forwards over at most [`few_rows::MAX_ROWS`] rows run on the
    /// few-rows kernel (`true`, unless `DID_CUDA_FEW_ROWS=off`) or on cuBLAS. An f32 backend
    /// always uses cuBLAS.
    pub fn set_few_rows_kernel(&self, on: bool) {
        self.few_rows
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether samplers may record a draft call's pass as a CUDA graph and replay it
    /// (`RecordingOps::can_record`; off unless `DID_CUDA_GRAPHS=on`, and only in bf16, where every
    /// op of a draft pass is this crate's kernel and none is cuBLAS's).
    ///
    /// A denoiser reads this when it is made, and a recording keeps the kernels chosen when it
    /// was recorded (attention kernel, key split, few-rows kernel): set these before making a
    /// denoiser, not while one samples. The capture is the calling thread's
    /// (`CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`) on the backend's one stream, so a backend that
    /// records must not be given work from another thread meanwhile.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Recorded graphs alive now.
    pub fn recordings(&self) -> usize {
        self.recordings.lock().map_or(0, |r| r.len())
    }

    /// Launches, cuBLAS calls, transfers and token draws since the backend was made
    /// (`DID_CUDA_STATS=1` prints them when it is dropped).
    pub fn counts(&self) -> Counts {
        self.counters.snapshot()
    }

    /// Why the first pass that could not be recorded as a graph failed, if one did (the pass
    /// ran unrecorded; [`Counts::failed_recordings`] counts them).
    pub fn first_failed_recording(&self) -> Option<String> {
        self.first_failed_recording
            .lock()
            .map_or(None, |why| why.clone())
    }

    /// Whether the few-rows kernel is in use (see [`CudaBackend::set_few_rows_kernel`]).
    pub fn few_rows_kernel(&self) -> bool {
        self.precision == Precision::Bf16
            && self.few_rows.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How the flash forward splits its key tiles.
    pub fn key_split(&self) -> KeySplit {
        match self.key_split.load(std::sync::atomic::Ordering::Relaxed) {
            0 => KeySplit::Auto,
            usize::MAX => KeySplit::Off,
            n => KeySplit::TilesPerBlock(n),
        }
    }

    /// Where tokens are drawn.
    pub fn draw_location(&self) -> DrawLocation {
        if self
            .draw_on_device
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            DrawLocation::Device
        } else {
            DrawLocation::Host
        }
    }

    /// The attention forward kernel in use.
    pub fn attention_kernel(&self) -> AttentionKernel {
        if self
            .flash_attention
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            AttentionKernel::Flash
        } else {
            AttentionKernel::Reference
        }
    }

    /// The LayerNorm kernel, with `modulation` = `[shift, scale, out]` pointers (zeros: none)
    /// for the fused pre-norm, `tokens` rows per sequence.
    #[allow(clippy::too_many_arguments)]
    fn layernorm(
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
        let args = [
            Arg::Ptr(self.ptr(x, n, "layernorm x")?),
            Arg::Ptr(self.ptr(weight, s.cols, "layernorm weight")?),
            Arg::Ptr(bp),
            Arg::Ptr(self.ptr_mut(out, n, "layernorm out")?),
            Arg::Ptr(self.ptr_mut(mean, s.rows, "layernorm mean")?),
            Arg::Ptr(self.ptr_mut(rstd, s.rows, "layernorm rstd")?),
            Arg::I64(s.rows as i64),
            Arg::I64(s.cols as i64),
            Arg::F32(s.eps),
            Arg::Ptr(shift),
            Arg::Ptr(scale),
            Arg::Ptr(modulated),
            Arg::I64(tokens as i64),
        ];
        if s.rows == 0 || s.cols == 0 {
            return Ok(());
        }
        self.launch(
            "layernorm_forward",
            (grid_rows(s.rows)?, 1, 1),
            norm_threads(s.cols),
            &args,
        )
    }

    /// `Some(sequences × heads)`, the flash kernels' grid width (their tiles of rows are the
    /// height, at most 65,535), where they compute this attention; `None` where the reference
    /// kernels do. The flash kernels keep the running maximum of the unscaled scores, which is
    /// the scaled scores' only for a positive scale.
    fn flash_heads(&self, s: &AttentionShape) -> Option<u32> {
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
    fn attention_forward_flash(
        &self,
        s: &AttentionShape,
        heads: u32,
        args: [Arg; 12],
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
        let tiles_arg = Arg::I32(per as i32);
        if splits == 1 {
            let whole = [&args[..], &[tiles_arg, Arg::Ptr(0), Arg::Ptr(0)]].concat();
            return self.launch("attention_forward_flash", grid, threads, &whole);
        }
        // SAFETY: uninitialised f32s; every split writes every element of its rows (an empty
        // split writes zeros and −∞), and the combine reads only those.
        let partial_out = unsafe { self.stream.alloc::<f32>(splits * rows * FLASH_HEAD_DIM) }?;
        // SAFETY: as above.
        let partial_lse = unsafe { self.stream.alloc::<f32>(splits * rows) }?;
        let (po, _po_sync) = partial_out.device_ptr(&self.stream);
        let (pl, _pl_sync) = partial_lse.device_ptr(&self.stream);
        // The outputs (args 10 and 11) go to the combine; the forward writes only partials.
        let [shape, m0, m1, m2, m3, m4, scale, q, k, v, out, lse] = args;
        let split_args = [
            shape,
            m0,
            m1,
            m2,
            m3,
            m4,
            scale,
            q,
            k,
            v,
            Arg::Ptr(0),
            Arg::Ptr(0),
            tiles_arg,
            Arg::Ptr(po),
            Arg::Ptr(pl),
        ];
        self.launch(
            "attention_forward_flash",
            (grid.0, grid.1, splits as u32),
            threads,
            &split_args,
        )?;
        let combine_args = [
            shape,
            Arg::I32(splits as i32),
            Arg::Ptr(po),
            Arg::Ptr(pl),
            out,
            lse,
        ];
        self.launch_warps("attention_combine_splits", rows, &combine_args)
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The storage precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// A host-to-device copy, counted.
    fn upload_bytes<T: DeviceRepr, Src: HostSlice<T> + ?Sized, Dst: DevicePtrMut<T>>(
        &self,
        src: &Src,
        dst: &mut Dst,
    ) -> Result<(), CudaError> {
        self.counters.add(Event::Upload, 1);
        Ok(self.stream.memcpy_htod(src, dst)?)
    }

    fn launch(
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
    fn launch_elements(
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
    fn launch_warps(
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

    fn device_ptr(
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
    fn ptr(
        &self,
        s: Slice<'_, CudaBuffer>,
        len: usize,
        what: &'static str,
    ) -> Result<u64, CudaError> {
        self.check_stored(s.buf, what)?;
        self.device_ptr(s.buf, s.offset, len, what)
    }

    fn ptr_mut(
        &self,
        s: SliceMut<'_, CudaBuffer>,
        len: usize,
        what: &'static str,
    ) -> Result<u64, CudaError> {
        self.check_stored(s.buf, what)?;
        self.device_ptr(s.buf, s.offset, len, what)
    }

    /// A kernel reading `store_t` must not get a bf16 backend's f32 buffer.
    fn check_stored(&self, buf: &CudaBuffer, what: &'static str) -> Result<(), CudaError> {
        if buf.f32 && self.precision == Precision::Bf16 {
            return Err(CudaError::Shape(format!(
                "{what}: an f32 buffer (from zeros_f32) where a bf16 tensor is expected"
            )));
        }
        Ok(())
    }

    /// An f32 buffer (the attention's log-sum-exp): from [`MemoryOps::zeros_f32`](did_core::backend::MemoryOps::zeros_f32).
    fn f32_ptr(
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

    fn ids_ptr(&self, ids: &CudaIds, rows: usize, what: &'static str) -> Result<u64, CudaError> {
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
    fn gate_ptr(
        &self,
        gate: Option<Slice<'_, CudaBuffer>>,
        batch: usize,
        channels: usize,
    ) -> Result<u64, CudaError> {
        gate.map_or(Ok(0), |g| self.ptr(g, batch * channels, "gate"))
    }

    /// `gated_residual_forward_into` (the kernel): `out = residual + gate·(y + bias)`, the bias
    /// (a null pointer: none) added into `y` first.
    #[allow(clippy::too_many_arguments)]
    /// `dy = gate·dresidual` (then the dropout's backward on it, with a mask), and
    /// `dgate += Σ_t dresidual·y`.
    #[allow(clippy::too_many_arguments)]
    fn gated_residual_backward_with(
        &self,
        dresidual: Slice<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        dy: SliceMut<'_, CudaBuffer>,
        dgate: Option<SliceMut<'_, CudaBuffer>>,
        dropout: Option<DropoutMask>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let n = batch * tokens * channels;
        let rp = self.ptr(dresidual, n, "dresidual")?;
        let yp = self.ptr(y, n, "gated y")?;
        let gp = self.gate_ptr(gate, batch, channels)?;
        let dyp = self.ptr_mut(dy, n, "gated dy")?;
        let mut args = vec![
            Arg::Ptr(rp),
            Arg::Ptr(gp),
            Arg::Ptr(dyp),
            Arg::I64(tokens as i64),
            Arg::I64(channels as i64),
            Arg::I64(n as i64),
        ];
        args.extend(dropout_args(dropout, n)?);
        self.launch_elements("gated_residual_backward_dy", n, &args)?;
        if let Some(dgate) = dgate {
            let dgp = self.ptr_mut(dgate, batch * channels, "dgate")?;
            self.column_sums(rp, yp, dgp, batch, tokens, channels, channels)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn residual_into(
        &self,
        residual: Slice<'_, CudaBuffer>,
        y: u64,
        bias: u64,
        dropout: Option<DropoutMask>,
        gate: Option<Slice<'_, CudaBuffer>>,
        out: SliceMut<'_, CudaBuffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let n = batch * tokens * channels;
        let gp = self.gate_ptr(gate, batch, channels)?;
        let mut args = vec![
            Arg::Ptr(self.ptr(residual, n, "residual")?),
            Arg::Ptr(y),
            Arg::Ptr(bias),
            Arg::Ptr(gp),
            Arg::Ptr(self.ptr_mut(out, n, "residual out")?),
            Arg::I64(tokens as i64),
            Arg::I64(channels as i64),
            Arg::I64(n as i64),
        ];
        args.extend(dropout_args(dropout, n)?);
        self.launch_elements("gated_residual_forward_into", n, &args)
    }

    /// `out[g, c] += Σ_r a[g, r, c]·b[g, r, c]` (`b = 0`: `a` alone) over `groups` groups of
    /// `rows` rows, rows `stride` elements apart (a group spans `rows · stride`).
    #[allow(clippy::too_many_arguments)]
    fn column_sums(
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
                self.launch(
                    "colsum_partial",
                    grid,
                    COLSUM_THREADS,
                    &[
                        Arg::Ptr(a),
                        Arg::Ptr(b),
                        Arg::Ptr(partial),
                        Arg::I64(rows as i64),
                        Arg::I64(cols as i64),
                        Arg::I64(stride as i64),
                        Arg::I64(chunk_rows as i64),
                    ],
                )
            },
        )
    }

    /// The two passes of a column sum; `partial_pass` fills `[groups, chunks, cols]` partials
    /// (grid z over the groups, chunks of at least `shape.min_rows` rows).
    fn column_sums_with(
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
        self.launch_elements(
            "colsum_finish",
            groups * cols,
            &[
                Arg::Ptr(pp),
                Arg::I64(chunks as i64),
                Arg::Ptr(out),
                Arg::I64(cols as i64),
                Arg::I64(groups as i64),
            ],
        )
    }

    fn reduce(
        &self,
        x: Slice<'_, CudaBuffer>,
        len: usize,
        squares: bool,
    ) -> Result<f64, CudaError> {
        let xp = self.ptr(x, len, "sum x")?;
        if len == 0 {
            return Ok(0.0);
        }
        // A grid that is a function of the length only (so the sum's order, and its bits, are
        // too): up to 1,024 blocks, about eight an SM on an H200 — 256 left three quarters of each SM
        // idle over a whole gradient vector — and no more blocks than chunks to read.
        let blocks = len.div_ceil(THREADS as usize * 8).clamp(1, 1024);
        let partial = self.stream.alloc_zeros::<f64>(blocks)?;
        let (pp, _sync) = partial.device_ptr(&self.stream);
        self.launch(
            "sum_partial",
            (blocks as u32, 1, 1),
            THREADS,
            &[
                Arg::Ptr(xp),
                Arg::I64(len as i64),
                Arg::I32(squares as i32),
                Arg::Ptr(pp),
            ],
        )?;
        self.counters.add(Event::Download, 1);
        let host = self.stream.clone_dtoh(&partial)?;
        self.stream.synchronize()?;
        Ok(host.iter().sum())
    }

    fn to_bytes(&self, host: &[f32]) -> Vec<u8> {
        match self.precision {
            Precision::F32 => host.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Precision::Bf16 => host
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
        }
    }
}

fn mask_args(mask: &AttentionMask) -> [Arg; 5] {
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

fn check_ids(ids: &[u32], table_rows: usize) -> Result<(), CudaError> {
    match did_core::backend::first_id_outside(ids, table_rows) {
        Some((row, id)) => Err(CudaError::TokenOutOfRange {
            id,
            row,
            rows: table_rows,
        }),
        None => Ok(()),
    }
}

fn op(trans: bool) -> blas_sys::cublasOperation_t {
    if trans {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

fn to_i32(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| {
        CudaError::Shape(format!(
            "matmul: {what} = {v} exceeds cuBLAS's 32-bit sizes"
        ))
    })
}

impl MemoryOps for CudaBackend {
    type Buffer = CudaBuffer;
    type Ids = CudaIds;
    type Error = CudaError;
    fn name(&self) -> &str {
        &self.name
    }
    fn zeros(&self, len: usize) -> Result<CudaBuffer, CudaError> {
        // One element at least: the driver refuses empty allocations.
        let mem = self
            .stream
            .alloc_zeros::<u8>(len.max(1) * self.precision.bytes())?;
        Ok(CudaBuffer {
            mem,
            len,
            f32: self.precision == Precision::F32,
        })
    }
    fn zeros_f32(&self, len: usize) -> Result<CudaBuffer, CudaError> {
        let mem = self.stream.alloc_zeros::<u8>(len.max(1) * 4)?;
        Ok(CudaBuffer {
            mem,
            len,
            f32: true,
        })
    }
    fn upload(&self, host: &[f32]) -> Result<CudaBuffer, CudaError> {
        let mut buf = self.zeros(host.len())?;
        if !host.is_empty() {
            let bytes = self.to_bytes(host);
            let mut view = buf.mem.slice_mut(0..bytes.len());
            self.upload_bytes(&bytes, &mut view)?;
        }
        Ok(buf)
    }
    fn stores_below_f32(&self) -> bool {
        self.precision == Precision::Bf16
    }
    fn upload_f32(&self, host: &[f32]) -> Result<CudaBuffer, CudaError> {
        let mut buf = self.zeros_f32(host.len())?;
        if !host.is_empty() {
            let bytes: Vec<u8> = host.iter().flat_map(|x| x.to_le_bytes()).collect();
            let mut view = buf.mem.slice_mut(0..bytes.len());
            self.upload_bytes(&bytes, &mut view)?;
        }
        Ok(buf)
    }
    fn round_into(
        &self,
        src: Slice<'_, CudaBuffer>,
        dst: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        let src = self.f32_ptr(src.buf, src.offset, len, "round_into source")?;
        let dst = self.ptr_mut(dst, len, "round_into destination")?;
        self.launch_elements(
            "round_f32_into",
            len,
            &[Arg::Ptr(src), Arg::Ptr(dst), Arg::I64(len as i64)],
        )
    }
    fn download(&self, src: Slice<'_, CudaBuffer>, out: &mut [f32]) -> Result<(), CudaError> {
        self.device_ptr(src.buf, src.offset, out.len(), "download")?;
        if out.is_empty() {
            return Ok(());
        }
        let esize = element_bytes(src.buf);
        let start = src.offset * esize;
        let mut bytes = vec![0u8; out.len() * esize];
        self.counters.add(Event::Download, 1);
        self.stream
            .memcpy_dtoh(&src.buf.mem.slice(start..start + bytes.len()), &mut bytes)?;
        self.stream.synchronize()?;
        if src.buf.f32 {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        } else {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        Ok(())
    }
    fn upload_ids(&self, host: &[u32]) -> Result<CudaIds, CudaError> {
        let mut dev = self.stream.alloc_zeros::<u32>(host.len().max(1))?;
        if !host.is_empty() {
            let mut view = dev.slice_mut(0..host.len());
            self.upload_bytes(host, &mut view)?;
        }
        Ok(CudaIds {
            dev,
            host: host.to_vec(),
        })
    }
    fn upload_ids_into(&self, host: &[u32], ids: &mut CudaIds) -> Result<(), CudaError> {
        if host.len() > ids.dev.len() {
            *ids = self.upload_ids(host)?;
            return Ok(());
        }
        if !host.is_empty() {
            let mut view = ids.dev.slice_mut(0..host.len());
            self.upload_bytes(host, &mut view)?;
        }
        ids.host.clear();
        ids.host.extend_from_slice(host);
        Ok(())
    }
    fn fill(&self, dst: SliceMut<'_, CudaBuffer>, len: usize, value: f32) -> Result<(), CudaError> {
        // A bf16 backend's f32 buffers (zeros_f32) have their own kernel.
        let kernel = if dst.buf.f32 && self.precision == Precision::Bf16 {
            "fill_f32"
        } else {
            "fill"
        };
        let p = self.device_ptr(dst.buf, dst.offset, len, "fill")?;
        self.launch_elements(
            kernel,
            len,
            &[Arg::Ptr(p), Arg::I64(len as i64), Arg::F32(value)],
        )
    }
    fn copy(
        &self,
        src: Slice<'_, CudaBuffer>,
        dst: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.copy_rows(src, len, dst, len, 1, len)
    }
    fn copy_rows(
        &self,
        src: Slice<'_, CudaBuffer>,
        src_stride: usize,
        dst: SliceMut<'_, CudaBuffer>,
        dst_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        self.copy_row_groups(
            src,
            dst,
            &RowGroups::rows(rows, cols, src_stride, dst_stride),
        )
    }
    fn copy_row_groups(
        &self,
        src: Slice<'_, CudaBuffer>,
        dst: SliceMut<'_, CudaBuffer>,
        layout: &RowGroups,
    ) -> Result<(), CudaError> {
        let s = self.ptr(src, layout.src_extent(), "copy src")?;
        let d = self.ptr_mut(dst, layout.dst_extent(), "copy dst")?;
        self.launch_elements(
            "copy_row_groups",
            layout.elements(),
            &[
                Arg::Ptr(s),
                Arg::I64(layout.src_stride as i64),
                Arg::I64(layout.src_group_stride as i64),
                Arg::Ptr(d),
                Arg::I64(layout.dst_stride as i64),
                Arg::I64(layout.dst_group_stride as i64),
                Arg::I64(layout.groups as i64),
                Arg::I64(layout.rows as i64),
                Arg::I64(layout.cols as i64),
            ],
        )
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()?;
        Ok(())
    }
    /// Rows of 64 elements: 128 bytes in bf16, so cuBLAS's 16-byte vector loads apply to every
    /// row (measured on the H200: `dW += dlogitsᵀ · x` for the head, 1,280 rows, 0.445 ms at
    /// GPT-2's 50,258 against 0.245 at 50,304).
    fn padded_row_stride(&self, cols: usize) -> usize {
        cols.next_multiple_of(LOGITS_ROW_ALIGNMENT)
    }
}

impl RecordingOps for CudaBackend {
    fn can_record(&self) -> bool {
        self.precision == Precision::Bf16
            && self.few_rows_kernel()
            && self.graphs.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn begin_recording(&self) -> Result<(), CudaError> {
        self.stream.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )?;
        Ok(())
    }
    fn end_recording(&self) -> Result<Option<RecordingId>, CudaError> {
        // cudarc keeps an error raised where it could not return one (a free that failed inside
        // a broken capture) and returns it from the next call's context check — which, left
        // there, would be `end_capture`'s, before it ends the capture: the stream would stay in
        // capture mode and every later launch fail. Take it first, end the capture regardless,
        // and drop what was recorded if anything failed.
        let pending = self.stream.context().check_err();
        let ended = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        pending?;
        let Some(graph) = ended? else {
            return Ok(None);
        };
        let id = self
            .next_recording
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.recordings
            .lock()
            .map_err(|_| CudaError::Shape("the recordings' lock was poisoned".into()))?
            .insert(id, Graph(graph));
        Ok(Some(RecordingId(id)))
    }
    fn replay_recording(&self, id: RecordingId) -> Result<(), CudaError> {
        let recordings = self
            .recordings
            .lock()
            .map_err(|_| CudaError::Shape("the recordings' lock was poisoned".into()))?;
        let graph = recordings
            .get(&id.0)
            .ok_or_else(|| CudaError::Shape(format!("no recording {}", id.0)))?;
        graph.0.launch()?;
        self.counters.add(Event::GraphLaunch, 1);
        Ok(())
    }
    fn recording_failed(&self, why: Option<&CudaError>) {
        self.counters.add(Event::FailedRecording, 1);
        if let Ok(mut first) = self.first_failed_recording.lock() {
            first.get_or_insert_with(|| match why {
                Some(e) => e.to_string(),
                None => "the capture ended without a graph".into(),
            });
        }
    }
    fn forget_recording(&self, id: RecordingId) {
        if let Ok(mut recordings) = self.recordings.lock() {
            recordings.remove(&id.0);
        }
    }
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
                return self.launch(
                    kernel,
                    (few_rows::blocks(g.n), 1, 1),
                    few_rows::THREADS,
                    &[
                        Arg::Ptr(pa),
                        Arg::I64(g.lda as i64),
                        Arg::Ptr(pb),
                        Arg::I64(g.ldb as i64),
                        Arg::Ptr(pc),
                        Arg::I64(g.ldc as i64),
                        Arg::I32(g.m as i32),
                        Arg::I64(g.n as i64),
                        Arg::I64(g.k as i64),
                        Arg::F32(g.beta),
                    ],
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
        self.launch_elements(
            "bias_add",
            shape.rows * shape.cols,
            &[
                Arg::Ptr(xp),
                Arg::Ptr(bp),
                Arg::I64(shape.rows as i64),
                Arg::I64(shape.cols as i64),
                Arg::I64(shape.stride as i64),
            ],
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
        self.launch(
            "layernorm_backward_dx",
            (grid_rows(s.rows)?, 1, 1),
            norm_threads(s.cols),
            &[
                Arg::Ptr(dp),
                Arg::Ptr(xp),
                Arg::Ptr(wp),
                Arg::Ptr(dxp),
                Arg::Ptr(sp),
                Arg::I64(rows),
                Arg::I64(cols),
                Arg::F32(s.eps),
            ],
        )?;
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
                self.launch(
                    "layernorm_dweight_partial",
                    grid,
                    128,
                    &[
                        Arg::Ptr(dp),
                        Arg::Ptr(xp),
                        Arg::Ptr(sp),
                        Arg::Ptr(partial),
                        Arg::I64(rows),
                        Arg::I64(cols),
                        Arg::I64(chunk_rows as i64),
                    ],
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
        let args = [
            Arg::Ptr(self.ptr(x, n, "modulate x")?),
            Arg::Ptr(self.ptr(shift, batch * channels, "modulate shift")?),
            Arg::Ptr(self.ptr(scale, batch * channels, "modulate scale")?),
            Arg::Ptr(self.ptr_mut(out, n, "modulate out")?),
            Arg::I64(tokens as i64),
            Arg::I64(channels as i64),
            Arg::I64(n as i64),
        ];
        self.launch_elements("modulate_forward", n, &args)
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
        self.launch_elements(
            "modulate_backward_dx",
            n,
            &[
                Arg::Ptr(dp),
                Arg::Ptr(sp),
                Arg::Ptr(dxp),
                Arg::I64(tokens as i64),
                Arg::I64(channels as i64),
                Arg::I64(n as i64),
            ],
        )?;
        self.column_sums(dp, xp, dsp, batch, tokens, channels, channels)
    }
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
        let [m0, m1, m2, m3, m4] = mask_args(mask);
        let args = [
            Arg::Attention(shape_c(s)),
            m0,
            m1,
            m2,
            m3,
            m4,
            Arg::F32(s.scale),
            Arg::Ptr(self.ptr(q, e.q, "attention q")?),
            Arg::Ptr(self.ptr(k, e.k, "attention k")?),
            Arg::Ptr(self.ptr(v, e.v, "attention v")?),
            Arg::Ptr(self.ptr_mut(out, e.out, "attention out")?),
            Arg::Ptr(self.f32_ptr(lse.buf, lse.offset, e.lse, "attention lse")?),
        ];
        if let Some(heads) = self.flash_heads(s) {
            if heads == 0 || s.q_len == 0 {
                return Ok(());
            }
            return self.attention_forward_flash(s, heads, args, e.lse);
        }
        self.launch_warps("attention_forward", e.lse, &args)
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
        let [m0, m1, m2, m3, m4] = mask_args(mask);
        let dq_args = [
            Arg::Attention(shape_c(s)),
            m0,
            m1,
            m2,
            m3,
            m4,
            Arg::F32(s.scale),
            Arg::Ptr(dp),
            Arg::Ptr(qp),
            Arg::Ptr(kp),
            Arg::Ptr(vp),
            Arg::Ptr(op_),
            Arg::Ptr(lp),
            Arg::Ptr(dqp),
            Arg::Ptr(deltap),
        ];
        let [m0, m1, m2, m3, m4] = mask_args(mask);
        let dkv_args = [
            Arg::Attention(shape_c(s)),
            m0,
            m1,
            m2,
            m3,
            m4,
            Arg::F32(s.scale),
            Arg::Ptr(dp),
            Arg::Ptr(qp),
            Arg::Ptr(kp),
            Arg::Ptr(vp),
            Arg::Ptr(lp),
            Arg::Ptr(deltap),
            Arg::Ptr(dkp),
            Arg::Ptr(dvp),
        ];
        // dQ first: it writes the δ the dK/dV pass reads.
        if let Some(heads) = self.flash_heads(s) {
            self.launch(
                "attention_backward_flash_dq",
                (heads, flash_tiles(s.q_len)?, 1),
                128,
                &dq_args,
            )?;
            // No keys, no key gradients (and a grid of zero rows is a launch error).
            if s.kv_len == 0 {
                return Ok(());
            }
            return self.launch(
                "attention_backward_flash_dkv",
                (heads, flash_tiles(s.kv_len)?, 1),
                128,
                &dkv_args,
            );
        }
        self.launch_warps("attention_backward_dq", e.lse, &dq_args)?;
        self.launch_warps(
            "attention_backward_dkv",
            s.batch * s.heads * s.kv_len,
            &dkv_args,
        )
    }
}

impl ActivationOps for CudaBackend {
    fn gated_residual_forward(
        &self,
        residual: SliceMut<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let n = batch * tokens * channels;
        let gp = self.gate_ptr(gate, batch, channels)?;
        let args = [
            Arg::Ptr(self.ptr_mut(residual, n, "residual")?),
            Arg::Ptr(self.ptr(y, n, "gated y")?),
            Arg::Ptr(gp),
            Arg::I64(tokens as i64),
            Arg::I64(channels as i64),
            Arg::I64(n as i64),
        ];
        self.launch_elements("gated_residual_forward", n, &args)
    }
    fn gated_residual_backward(
        &self,
        dresidual: Slice<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        dy: SliceMut<'_, CudaBuffer>,
        dgate: Option<SliceMut<'_, CudaBuffer>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        self.gated_residual_backward_with(
            dresidual, y, gate, dy, dgate, None, batch, tokens, channels,
        )
    }
    fn gelu_forward(
        &self,
        x: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_forward("gelu_forward", x, out, len)
    }
    fn gelu_backward(
        &self,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_backward("gelu_backward", dout, x, dx, len)
    }
    fn silu_forward(
        &self,
        x: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_forward("silu_forward", x, out, len)
    }
    fn silu_backward(
        &self,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_backward("silu_backward", dout, x, dx, len)
    }
    fn dropout(
        &self,
        x: SliceMut<'_, CudaBuffer>,
        len: usize,
        p: f32,
        stream: &RngStream,
    ) -> Result<(), CudaError> {
        let xp = self.ptr_mut(x, len, "dropout x")?;
        if p <= 0.0 {
            return Ok(());
        }
        let mut args = vec![Arg::Ptr(xp), Arg::I64(len as i64)];
        args.extend(dropout_args(Some(DropoutMask { p, stream: *stream }), len)?);
        self.launch_elements("dropout", len, &args)
    }
}

impl LossOps for CudaBackend {
    fn embedding_forward(
        &self,
        ids: &CudaIds,
        table: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        rows: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let ip = self.ids_ptr(ids, rows, "embedding ids")?;
        let table_rows = table.buf.len.saturating_sub(table.offset) / channels.max(1);
        check_ids(&ids.host[..rows], table_rows)?;
        let args = [
            Arg::Ptr(ip),
            Arg::Ptr(self.ptr(table, table_rows * channels, "embedding table")?),
            Arg::Ptr(self.ptr_mut(out, rows * channels, "embedding out")?),
            Arg::I64(rows as i64),
            Arg::I64(channels as i64),
        ];
        self.launch_elements("embedding_forward", rows * channels, &args)
    }
    fn embedding_backward(
        &self,
        ids: &CudaIds,
        dout: Slice<'_, CudaBuffer>,
        dtable: SliceMut<'_, CudaBuffer>,
        rows: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        self.ids_ptr(ids, rows, "embedding ids")?;
        let table_rows = dtable.buf.len.saturating_sub(dtable.offset) / channels.max(1);
        check_ids(&ids.host[..rows], table_rows)?;
        let dout = self.ptr(dout, rows * channels, "embedding dout")?;
        let dtable = self.ptr_mut(dtable, table_rows * channels, "embedding dtable")?;
        if rows == 0 || channels == 0 {
            return Ok(());
        }
        // The table's length is read off the buffer, which runs on past the embedding into the
        // other parameters (≈ 220 k rows for `small`): count over the ids that occur instead.
        let ids = &ids.host[..rows];
        let id_span = ids.iter().max().map_or(0, |&id| id as usize + 1);
        let grouped = rows_by_id::RowsById::new(ids, id_span);
        let groups = grouped.ids.len();
        let words = grouped.words();
        let mut dev = self.stream.alloc_zeros::<u32>(words.len())?;
        self.upload_bytes(&words, &mut dev)?;
        let (base, _sync) = dev.device_ptr(&self.stream);
        let args = [
            Arg::Ptr(base),
            Arg::Ptr(base + 4 * (groups as u64 + 1)),
            Arg::Ptr(base + 4 * (2 * groups as u64 + 1)),
            Arg::Ptr(dout),
            Arg::Ptr(dtable),
            Arg::I64(channels as i64),
        ];
        // Two channels a thread (the kernel's layout), 64 threads a block: an id's channels
        // spread over several blocks, so the long group (the mask token) is not one SM's work.
        let channel_blocks = grid_rows(channels.div_ceil(2 * EMBEDDING_THREADS as usize))?;
        self.launch(
            "embedding_backward",
            (grid_rows(groups)?, channel_blocks, 1),
            EMBEDDING_THREADS,
            &args,
        )
    }
    fn softmax_cross_entropy(
        &self,
        logits: SliceMut<'_, CudaBuffer>,
        targets: &CudaIds,
        weights: Slice<'_, CudaBuffer>,
        losses: SliceMut<'_, CudaBuffer>,
        shape: RowMajor,
        excluded: Option<u32>,
        grad_scale: f32,
    ) -> Result<(), CudaError> {
        let (rows, vocab) = (shape.rows, shape.cols);
        let tp = self.ids_ptr(targets, rows, "cross-entropy targets")?;
        check_ids(&targets.host[..rows], vocab)?;
        let args = [
            Arg::Ptr(self.ptr_mut(logits, shape.extent(), "cross-entropy logits")?),
            Arg::Ptr(tp),
            Arg::Ptr(self.ptr(weights, rows, "cross-entropy weights")?),
            Arg::Ptr(self.ptr_mut(losses, rows, "cross-entropy losses")?),
            Arg::I64(rows as i64),
            Arg::I64(vocab as i64),
            Arg::I64(shape.stride as i64),
            Arg::I64(
                excluded
                    .filter(|&e| (e as usize) < vocab)
                    .map_or(-1, i64::from),
            ),
            Arg::F32(grad_scale),
        ];
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        self.launch(
            "softmax_cross_entropy",
            (grid_rows(rows)?, 1, 1),
            THREADS,
            &args,
        )
    }
}

impl OptimizerOps for CudaBackend {
    fn sum(&self, x: Slice<'_, CudaBuffer>, len: usize) -> Result<f64, CudaError> {
        self.reduce(x, len, false)
    }
    fn sum_squares(&self, x: Slice<'_, CudaBuffer>, len: usize) -> Result<f64, CudaError> {
        self.reduce(x, len, true)
    }
    fn scale(&self, x: SliceMut<'_, CudaBuffer>, len: usize, factor: f32) -> Result<(), CudaError> {
        let p = self.ptr_mut(x, len, "scale x")?;
        self.launch_elements(
            "scale",
            len,
            &[Arg::Ptr(p), Arg::I64(len as i64), Arg::F32(factor)],
        )
    }
    fn adamw(
        &self,
        hp: &AdamW,
        params: SliceMut<'_, CudaBuffer>,
        grads: Slice<'_, CudaBuffer>,
        m: SliceMut<'_, CudaBuffer>,
        v: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        // Bias corrections in f32 on the host, as the CPU reference.
        let step = hp.step.max(1) as i32;
        let bc1 = 1.0 - hp.beta1.powi(step);
        let bc2 = 1.0 - hp.beta2.powi(step);
        let args = [
            Arg::Ptr(self.ptr_mut(params, len, "adamw params")?),
            Arg::Ptr(self.ptr(grads, len, "adamw grads")?),
            Arg::Ptr(self.ptr_mut(m, len, "adamw m")?),
            Arg::Ptr(self.ptr_mut(v, len, "adamw v")?),
            Arg::I64(len as i64),
            Arg::F32(hp.lr),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(hp.weight_decay),
            Arg::F32(bc1),
            Arg::F32(bc2),
        ];
        self.launch_elements("adamw", len, &args)
    }
    fn ema_update(
        &self,
        ema: SliceMut<'_, CudaBuffer>,
        params: Slice<'_, CudaBuffer>,
        len: usize,
        decay: f32,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(self.ptr_mut(ema, len, "ema")?),
            Arg::Ptr(self.ptr(params, len, "ema params")?),
            Arg::I64(len as i64),
            Arg::F32(decay),
        ];
        self.launch_elements("ema_update", len, &args)
    }
    /// One `optimizer_step` launch: masters, moments and the EMA in f32 (`upload_f32`,
    /// `zeros_f32`), gradients and the rounded copies in the storage precision.
    fn optimizer_step(
        &self,
        step: &OptimizerStep,
        params: UpdatedWeights<'_, CudaBuffer>,
        grads: SliceMut<'_, CudaBuffer>,
        m: SliceMut<'_, CudaBuffer>,
        v: SliceMut<'_, CudaBuffer>,
        ema: Option<UpdatedWeights<'_, CudaBuffer>>,
        len: usize,
    ) -> Result<(), CudaError> {
        let f32_at = |s: &SliceMut<'_, CudaBuffer>, what| self.f32_ptr(s.buf, s.offset, len, what);
        let stored_at = |s: Option<SliceMut<'_, CudaBuffer>>, what| match s {
            Some(s) => self.ptr_mut(s, len, what),
            None => Ok(0),
        };
        if self.precision == Precision::Bf16 && params.rounded.is_none() {
            return Err(CudaError::Shape(
                "optimizer_step: bf16 storage needs the weights' rounded copy for the model \
                 (the master is f32)"
                    .into(),
            ));
        }
        let master = f32_at(&params.master, "optimizer master weights")?;
        let rounded = stored_at(params.rounded, "optimizer rounded weights")?;
        let grads = self.ptr_mut(grads, len, "optimizer gradients")?;
        let m = f32_at(&m, "optimizer first moments")?;
        let v = f32_at(&v, "optimizer second moments")?;
        let (ema, ema_rounded, ema_decay) = match (ema, step.ema_decay) {
            (Some(ema), Some(decay)) => {
                if self.precision == Precision::Bf16 && ema.rounded.is_none() {
                    return Err(CudaError::Shape(
                        "optimizer_step: bf16 storage needs the EMA's rounded copy for the \
                         model (the EMA's master is f32)"
                            .into(),
                    ));
                }
                (
                    f32_at(&ema.master, "optimizer EMA")?,
                    stored_at(ema.rounded, "optimizer rounded EMA")?,
                    decay,
                )
            }
            _ => (0, 0, 0.0),
        };
        let hp = &step.adamw;
        // Bias corrections in f32 on the host, as the CPU reference.
        let t = hp.step.max(1) as i32;
        let args = [
            Arg::Ptr(master),
            Arg::Ptr(rounded),
            Arg::Ptr(grads),
            Arg::Ptr(m),
            Arg::Ptr(v),
            Arg::Ptr(ema),
            Arg::Ptr(ema_rounded),
            Arg::I64(len as i64),
            Arg::F32(step.grad_scale),
            Arg::F32(hp.lr),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(hp.weight_decay),
            Arg::F32(1.0 - hp.beta1.powi(t)),
            Arg::F32(1.0 - hp.beta2.powi(t)),
            Arg::F32(ema_decay),
        ];
        self.launch_elements("optimizer_step", len, &args)
    }
}

impl DrawOps for CudaBackend {
    /// [`DrawLocation::Host`]: one download of every row, then the reference draw on the host,
    /// rows spread over its cores.
    /// [`DrawLocation::Device`]: the `draw_tokens` kernel, then the reference draw on the host
    /// for the rows it could not certify (see [`draw`]). The same tokens as the CPU backend
    /// either way.
    fn draw_tokens(
        &self,
        logits: Slice<'_, CudaBuffer>,
        vocab: usize,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        out: &mut [SampledToken],
    ) -> Result<(), CudaError> {
        let rows = draws.len().min(out.len());
        let logits_ptr = self.ptr(logits, rows * vocab, "draw logits")?;
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        if self.draw_location() == DrawLocation::Host {
            self.counters.add(Event::HostDraw, rows as u64);
            let mut host = vec![0.0f32; rows * vocab];
            self.download(logits, &mut host)?;
            let draw_rows = |logits: &[f32], draws: &[DrawSpec], out: &mut [SampledToken]| {
                let mut scratch = DrawScratch::default();
                for ((row, spec), slot) in logits.chunks_exact(vocab).zip(draws).zip(out) {
                    *slot = draw_token(row, mask_id, nucleus, &spec.stream, spec.row, &mut scratch);
                }
            };
            // Each row is its own stream: spread over the host's cores, the tokens are the same.
            // The first share is drawn on this thread (at batch 1 that is all of it).
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per_thread = rows.div_ceil(threads.min(rows));
            let mut shares = host
                .chunks(per_thread * vocab)
                .zip(draws.chunks(per_thread))
                .zip(out[..rows].chunks_mut(per_thread));
            let first = shares.next();
            std::thread::scope(|scope| {
                for ((logits, draws), out) in shares {
                    scope.spawn(move || draw_rows(logits, draws, out));
                }
                if let Some(((logits, draws), out)) = first {
                    draw_rows(logits, draws, out);
                }
            });
            return Ok(());
        }
        let words: Vec<u32> = draws[..rows].iter().flat_map(draw::stream_words).collect();
        let mut specs = self.stream.alloc_zeros::<u32>(words.len())?;
        self.upload_bytes(&words, &mut specs)?;
        let ids = self.stream.alloc_zeros::<u32>(2 * rows)?;
        let confidence = self.stream.alloc_zeros::<f64>(3 * rows)?;
        {
            let (specs_ptr, _s) = specs.device_ptr(&self.stream);
            let (ids_ptr, _i) = ids.device_ptr(&self.stream);
            let (confidence_ptr, _c) = confidence.device_ptr(&self.stream);
            let args = [
                Arg::Ptr(logits_ptr),
                Arg::I64(vocab as i64),
                Arg::I64(i64::from(mask_id)),
                Arg::Ptr(specs_ptr),
                Arg::F64(nucleus.p()),
                Arg::I32(i32::from(nucleus.rule() == NucleusRule::SmallestCover)),
                Arg::Ptr(ids_ptr),
                Arg::Ptr(confidence_ptr),
            ];
            self.launch("draw_tokens", (grid_rows(rows)?, 1, 1), DRAW_THREADS, &args)?;
        }
        self.counters.add(Event::Download, 2);
        let ids = self.stream.clone_dtoh(&ids)?;
        let confidence = self.stream.clone_dtoh(&confidence)?;
        self.stream.synchronize()?;
        let (mut row, mut scratch) = (vec![0.0f32; vocab], DrawScratch::default());
        for (r, (spec, slot)) in draws.iter().zip(out.iter_mut()).take(rows).enumerate() {
            let certified = draw::certified_token(
                [ids[2 * r], ids[2 * r + 1]],
                [
                    confidence[3 * r],
                    confidence[3 * r + 1],
                    confidence[3 * r + 2],
                ],
            );
            self.counters.add(
                if certified.is_some() {
                    Event::DeviceDraw
                } else {
                    Event::HostRedraw
                },
                1,
            );
            *slot = match certified {
                Some(token) => token,
                None => {
                    self.download(Slice::at(logits.buf, logits.offset + r * vocab), &mut row)?;
                    draw_token(&row, mask_id, nucleus, &spec.stream, spec.row, &mut scratch)
                }
            };
        }
        Ok(())
    }
}

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
        let head = [
            Arg::Ptr(px),
            Arg::I64(d_in as i64),
            Arg::Ptr(pw),
            Arg::I64(d_in as i64),
            Arg::Ptr(py),
            Arg::I32(rows as i32),
            Arg::I64(d_out as i64),
            Arg::I64(d_in as i64),
        ];
        let tail: Vec<Arg> = match then {
            LinearThen::BiasGelu { bias, gelu } => vec![
                Arg::Ptr(self.ptr(bias, d_out, "linear bias")?),
                Arg::Ptr(self.ptr_mut(gelu, n, "linear gelu")?),
            ],
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
                vec![
                    Arg::Ptr(match bias {
                        Some(b) => self.ptr(b, d_out, "linear bias")?,
                        None => 0,
                    }),
                    Arg::Ptr(self.gate_ptr(gate, rows / tokens, d_out)?),
                    Arg::Ptr(self.ptr(residual, n, "linear residual")?),
                    Arg::Ptr(self.ptr_mut(out, n, "linear out")?),
                    Arg::I64(tokens as i64),
                ]
            }
        };
        let args: Vec<Arg> = head.into_iter().chain(tail).collect();
        self.launch(
            kernel,
            (few_rows::blocks(d_out), 1, 1),
            few_rows::THREADS,
            &args,
        )
    }
    fn gated_residual_forward_into(
        &self,
        residual: Slice<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        out: SliceMut<'_, CudaBuffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        // Without a bias the kernel only reads y.
        let yp = self.ptr(y, batch * tokens * channels, "gated y")?;
        self.residual_into(residual, yp, 0, None, gate, out, batch, tokens, channels)
    }
    fn bias_gated_residual_forward_into(
        &self,
        residual: Slice<'_, CudaBuffer>,
        y: SliceMut<'_, CudaBuffer>,
        bias: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        out: SliceMut<'_, CudaBuffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let yp = self.ptr_mut(y, batch * tokens * channels, "biased y")?;
        let bp = self.ptr(bias, channels, "bias")?;
        self.residual_into(residual, yp, bp, None, gate, out, batch, tokens, channels)
    }
    fn bias_dropout_gated_residual_forward_into(
        &self,
        residual: Slice<'_, CudaBuffer>,
        y: SliceMut<'_, CudaBuffer>,
        bias: Option<Slice<'_, CudaBuffer>>,
        dropout: DropoutMask,
        gate: Option<Slice<'_, CudaBuffer>>,
        out: SliceMut<'_, CudaBuffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let yp = self.ptr_mut(y, batch * tokens * channels, "dropped y")?;
        let bp = match bias {
            Some(b) => self.ptr(b, channels, "bias")?,
            None => 0,
        };
        self.residual_into(
            residual,
            yp,
            bp,
            Some(dropout),
            gate,
            out,
            batch,
            tokens,
            channels,
        )
    }
    fn gated_residual_backward_dropout(
        &self,
        dresidual: Slice<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        dy: SliceMut<'_, CudaBuffer>,
        dgate: Option<SliceMut<'_, CudaBuffer>>,
        dropout: DropoutMask,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let d = Some(dropout);
        self.gated_residual_backward_with(dresidual, y, gate, dy, dgate, d, batch, tokens, channels)
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
        let args = [
            Arg::Ptr(self.ptr_mut(x, n, "bias_gelu x")?),
            Arg::Ptr(self.ptr(bias, cols, "bias")?),
            Arg::Ptr(self.ptr_mut(out, n, "bias_gelu out")?),
            Arg::I64(rows as i64),
            Arg::I64(cols as i64),
        ];
        self.launch_elements("bias_gelu_forward", n, &args)
    }
}

impl CudaBackend {
    /// `out = f(x)` element-wise (GELU, SiLU).
    fn activation_forward(
        &self,
        kernel: &'static str,
        x: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(self.ptr(x, len, kernel)?),
            Arg::Ptr(self.ptr_mut(out, len, kernel)?),
            Arg::I64(len as i64),
        ];
        self.launch_elements(kernel, len, &args)
    }

    /// `dx += dout · f'(x)` element-wise.
    fn activation_backward(
        &self,
        kernel: &'static str,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(self.ptr(dout, len, kernel)?),
            Arg::Ptr(self.ptr(x, len, kernel)?),
            Arg::Ptr(self.ptr_mut(dx, len, kernel)?),
            Arg::I64(len as i64),
        ];
        self.launch_elements(kernel, len, &args)
    }

    /// The `rope` kernel on `x`; with `copy` = (columns from, columns, destination, destination
    /// row stride, destination sequence stride), also the copy of those columns of every row,
    /// as rotated (`rope_forward_and_copy`).
    fn rope(
        &self,
        s: &RopeShape,
        x: SliceMut<'_, CudaBuffer>,
        inverse: bool,
    ) -> Result<(), CudaError> {
        let p = self.ptr_mut(x, s.extent(), "rope x")?;
        self.rope_at(s, p, inverse, None)
    }

    fn rope_at(
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
        self.launch_elements(
            "rope",
            s.batch.div_ceil(per) * s.tokens * s.heads * half + s.batch * s.tokens * plain,
            &[
                Arg::Ptr(p),
                Arg::I64(s.batch as i64),
                Arg::I64(s.tokens as i64),
                Arg::I64(s.heads as i64),
                Arg::I64(s.head_dim as i64),
                Arg::I64(s.stride as i64),
                Arg::I64(s.batch_stride as i64),
                Arg::I64(s.position_offset as i64),
                Arg::F64(f64::from(s.base)),
                Arg::I32(inverse as i32),
                Arg::I64(per as i64),
                Arg::Ptr(dst),
                Arg::I64(col0 as i64),
                Arg::I64(cols as i64),
                Arg::I64(dst_stride as i64),
                Arg::I64(dst_batch_stride as i64),
            ],
        )
    }
}

/// Scratch buffers are freed in stream order into the device's default memory pool, whose release
/// threshold of 0 hands the memory back to the driver at every synchronize, so the next step maps
/// it again. Keep it, as PyTorch's caching allocator does. Best effort: where the driver refuses,
/// the default stays, which is only slower.
fn keep_freed_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: a valid device of a live context; the attribute is a u64 passed by pointer.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

/// Bytes per element of `buf`: f32 or bf16.
fn element_bytes(buf: &CudaBuffer) -> usize {
    if buf.f32 {
        4
    } else {
        2
    }
}

/// The kernels' `DROPOUT_ARGS` (kernels/elementwise.cu): p, keep scale, the stream's key, step
/// and tag; p = 0 (no dropout) for `None`. A mask draws one word an element from one stream row.
fn dropout_args(dropout: Option<DropoutMask>, len: usize) -> Result<[Arg; 6], CudaError> {
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
fn grid_rows(rows: usize) -> Result<u32, CudaError> {
    i32::try_from(rows)
        .map(|r| r as u32)
        .map_err(|_| CudaError::Shape(format!("{rows} rows exceed one grid")))
}

/// How a column sum's first pass tiles its input: rows a chunk (at least), columns a block.
#[derive(Clone, Copy)]
struct ChunkShape {
    min_rows: usize,
    cols_per_block: usize,
}

/// Threads of a LayerNorm block (one row each): one warp up to 1,024 columns, which holds the row
/// in registers after one round of loads (kernels/norm.cu, `row_in_registers`) — the backward
/// took 167 µs a call on the H200 with 256 threads making four dependent passes of three loads
/// each — else THREADS. The forward and the backward must agree: the backward recomputes the
/// statistics in the forward's order.
fn norm_threads(cols: usize) -> u32 {
    if cols <= 1024 {
        32
    } else {
        THREADS
    }
}

/// The flash kernels' grid height: one block per 64 rows.
fn flash_tiles(rows: usize) -> Result<u32, CudaError> {
    flash_blocks(rows, 64)
}

/// One block per `per_block` rows, in a grid's y dimension (at most 65,535).
fn flash_blocks(rows: usize, per_block: usize) -> Result<u32, CudaError> {
    u32::try_from(rows.div_ceil(per_block))
        .ok()
        .filter(|&tiles| tiles <= 65_535)
        .ok_or_else(|| {
            CudaError::Shape(format!("attention: {rows} rows is too many for one launch"))
        })
}

fn attention_extents(s: &AttentionShape) -> Result<did_core::backend::AttentionExtents, CudaError> {
    if s.head_dim > MAX_HEAD_DIM {
        return Err(CudaError::Shape(format!(
            "attention: head_dim {} exceeds the {MAX_HEAD_DIM} the kernels hold in registers",
            s.head_dim
        )));
    }
    s.extents().map_err(CudaError::Shape)
}

fn shape_c(s: &AttentionShape) -> AttentionShapeC {
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

#[cfg(test)]
mod launch_constants {
    use super::*;

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
