//! The device a backend runs on: the context, its stream, cuBLAS, the kernels compiled for it
//! ([`crate::kernels`]), and the switches that choose between kernels ([`CudaOptions`]).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtrMut};

use crate::counters::Counts;
use crate::kernel::{Kernel, Source};
use crate::ops::recording::*;
use crate::{kernels, probe, CudaError, CudaOptions, DrawLocation, KeySplit};

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
    /// on a GPU (docs/perf/gpu.md, "Measurements behind the code's choices"): the default wherever
    /// it can run; `DID_CUDA_ATTENTION=reference` turns it off.
    Flash,
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    pub(crate) _ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    /// cuBLAS's workspace, ours (`cublasSetWorkspace`); after `blas`, so freed after it.
    pub(crate) _blas_workspace: CudaSlice<u8>,
    pub(crate) precision: Precision,
    pub(crate) functions: HashMap<Kernel, CudaFunction>,
    pub(crate) name: String,
    pub(crate) device_name: String,
    /// [`AttentionKernel::Flash`] in use (an atomic: the backend is shared behind `&self`).
    pub(crate) flash_attention: std::sync::atomic::AtomicBool,
    /// [`DrawLocation::Device`] in use.
    pub(crate) draw_on_device: std::sync::atomic::AtomicBool,
    /// The flash forward's [`KeySplit`]: 0 = auto, `usize::MAX` = off, n = n tiles a block.
    pub(crate) key_split: std::sync::atomic::AtomicUsize,
    /// The device's streaming multiprocessors, for [`key_split::tiles_per_split`].
    pub(crate) sms: usize,
    /// Linear forwards over ≤ 8 rows on the few-rows kernel ([`few_rows`]) in bf16.
    pub(crate) few_rows: std::sync::atomic::AtomicBool,
    /// Launches, transfers and draws so far ([`CudaBackend::counts`]).
    pub(crate) counters: crate::counters::Counters,
    /// Draft passes recorded as CUDA graphs ([`CudaBackend::set_graphs`]).
    pub(crate) graphs: std::sync::atomic::AtomicBool,
    /// The recorded graphs, by [`RecordingId`].
    pub(crate) recordings: std::sync::Mutex<HashMap<u64, Graph>>,
    pub(crate) next_recording: std::sync::atomic::AtomicU64,
    /// Why the first pass that could not be recorded failed ([`CudaOptions::report_counts`]
    /// prints it).
    pub(crate) first_failed_recording: std::sync::Mutex<Option<String>>,
    /// [`CudaOptions::report_counts`].
    pub(crate) report_counts: bool,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.report_counts {
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

/// Scratch buffers are freed in stream order into the device's default memory pool, whose release
/// threshold of 0 hands the memory back to the driver at every synchronize, so the next step maps
/// it again. Keep it, as PyTorch's caching allocator does. Best effort: where the driver refuses,
/// the default stays, which is only slower.
pub(crate) fn keep_freed_memory(ctx: &CudaContext) {
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

impl CudaBackend {
    /// Opens device `ordinal` with the default [`CudaOptions`], compiles every kernel for it
    /// with NVRTC and sets up cuBLAS. Fails with [`CudaError::Unavailable`] when a library or
    /// the device is missing.
    pub fn new(ordinal: usize, precision: Precision) -> Result<Self, CudaError> {
        Self::with_options(ordinal, precision, CudaOptions::default())
    }

    /// [`CudaBackend::new`] with the kernels and paths `options` chooses.
    pub fn with_options(
        ordinal: usize,
        precision: Precision,
        options: CudaOptions,
    ) -> Result<Self, CudaError> {
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
        let tensor_cores = precision == Precision::Bf16 && major >= 8;
        for source in Source::ALL {
            let ptx = kernels::compile(precision, source.file(), source.text(), arch)?;
            let module = ctx.load_module(ptx)?;
            for &kernel in Kernel::ALL.iter().filter(|k| k.source() == source) {
                if !kernel.needs_bf16_sm80() || tensor_cores {
                    functions.insert(kernel, module.load_function(kernel.name())?);
                }
            }
        }
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
            draw_on_device: std::sync::atomic::AtomicBool::new(
                options.draw == DrawLocation::Device,
            ),
            key_split: std::sync::atomic::AtomicUsize::new(0),
            sms,
            few_rows: std::sync::atomic::AtomicBool::new(options.few_rows),
            counters: crate::counters::Counters::default(),
            graphs: std::sync::atomic::AtomicBool::new(options.graphs),
            report_counts: options.report_counts,
            recordings: std::sync::Mutex::new(HashMap::new()),
            next_recording: std::sync::atomic::AtomicU64::new(0),
            first_failed_recording: std::sync::Mutex::new(None),
        })
        .inspect(|b| {
            b.set_key_split(options.key_split);
            // The flash kernels wherever they can run (bf16, sm_80+); an f32 backend keeps the
            // reference kernels.
            if options.attention == AttentionKernel::Flash {
                let _ = b.set_attention_kernel(AttentionKernel::Flash);
            }
        })
    }

    /// Chooses the attention forward kernel; [`AttentionKernel::Flash`] needs bf16 storage and
    /// compute capability ≥ 8.0.
    pub fn set_attention_kernel(&self, kernel: AttentionKernel) -> Result<(), CudaError> {
        let flash = kernel == AttentionKernel::Flash;
        if flash && !self.functions.contains_key(&Kernel::AttentionForwardFlash) {
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

    /// Chooses where tokens are drawn (`DID_CUDA_DRAW=device|host`; device unless told, as every
    /// GPU check passed with it: docs/perf/gpu.md). Either way the tokens are those of
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

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The storage precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }
}
