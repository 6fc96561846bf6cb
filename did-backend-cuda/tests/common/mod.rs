//! The differential harness: one case, written once over `B: Backend`, runs
//! on the CPU backend (the oracle) and on the CUDA backend in both precisions;
//! every output is compared element by element with per-precision tolerances.
//! Without CUDA each test prints `SKIP (no CUDA)` and passes, unless
//! `DID_REQUIRE_CUDA=1`.

#![allow(dead_code)]

use std::sync::{Mutex, OnceLock};

use did_backend_cpu::CpuBackend;
use did_backend_cuda::{probe, AttentionKernel, CudaBackend, CudaOptions, Precision};
pub use did_backend_suite::{compare, Case, Out, Tol};
use did_backend_suite::{Harness, Storage};

fn gpu_slot(precision: Precision) -> &'static Mutex<CudaBackend> {
    static F32_GPU: OnceLock<Mutex<CudaBackend>> = OnceLock::new();
    static BF16_GPU: OnceLock<Mutex<CudaBackend>> = OnceLock::new();
    let slot = match precision {
        Precision::F32 => &F32_GPU,
        Precision::Bf16 => &BF16_GPU,
    };
    slot.get_or_init(|| {
        // DID_CUDA_* choose the kernels, as for `did` (scripts/gpu-check.sh reruns with them).
        let options = CudaOptions::from_vars(|name| std::env::var(name).ok())
            .unwrap_or_else(|e| panic!("{e}"));
        Mutex::new(
            CudaBackend::with_options(0, precision, options)
                .unwrap_or_else(|e| panic!("CUDA backend: {e}")),
        )
    })
}

/// Runs `f` with the shared GPU backend of `precision` (one per process: kernels compile once).
pub fn with_gpu<R>(precision: Precision, f: impl FnOnce(&CudaBackend) -> R) -> R {
    let guard = gpu_slot(precision)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    f(&guard)
}

/// Whether to run the GPU test: without CUDA it prints `SKIP (no CUDA): <test>` and returns
/// false, unless `DID_REQUIRE_CUDA=1`, where it panics so that a missing library cannot pass
/// for a green run.
pub fn gpu(test: &str) -> bool {
    match probe() {
        Ok(_) => true,
        Err(why) => {
            if std::env::var("DID_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("DID_REQUIRE_CUDA=1 but CUDA is not available for {test}: {why}");
            }
            eprintln!("SKIP (no CUDA): {test}: {why}");
            false
        }
    }
}

/// Runs `case` on the CPU and on the GPU in both precisions and compares.
pub fn check<C: Case>(
    label: &str,
    case: &C,
    f32_tol: Tol,
    bf16_tol: Option<Tol>,
) -> Result<(), String> {
    check_with_attention(label, case, f32_tol, bf16_tol, None)
}

/// [`check`] with the GPU backends on `attention` (where it can run) for the case, then back on
/// the kernel they had.
pub fn check_with_attention<C: Case>(
    label: &str,
    case: &C,
    f32_tol: Tol,
    bf16_tol: Option<Tol>,
    attention: Option<AttentionKernel>,
) -> Result<(), String> {
    let cpu = case
        .run(&CpuBackend::new())
        .map_err(|e| format!("{label}: cpu: {e}"))?;
    let mut modes = vec![(Precision::F32, f32_tol)];
    if let Some(t) = bf16_tol {
        modes.push((Precision::Bf16, t));
    }
    for (precision, tol) in modes {
        let out = with_gpu(precision, |g| {
            let before = g.attention_kernel();
            if let Some(kernel) = attention {
                g.set_attention_kernel(kernel)?;
            }
            let out = case.run(g);
            g.set_attention_kernel(before)?;
            out
        })
        .map_err(|e| format!("{label} {precision:?}: gpu: {e}"))?;
        for ((name, c), (_, g)) in cpu.iter().zip(&out) {
            compare(&format!("{label} {precision:?} {name}"), c, g, tol)?;
        }
    }
    Ok(())
}

/// The CUDA backend as the suite's [`Harness`]: f32 and bf16 storage, each on the reference
/// attention kernels (the flash kernels have their own tests in ops.rs).
pub struct CudaHarness;

impl Harness for CudaHarness {
    fn available(test: &str) -> bool {
        gpu(test)
    }

    fn configurations() -> Vec<(&'static str, Storage)> {
        vec![("f32", Storage::F32), ("bf16", Storage::Bf16)]
    }

    fn run<C: Case>(index: usize, case: &C) -> Result<Out, String> {
        let precision = [Precision::F32, Precision::Bf16][index];
        with_gpu(precision, |g| {
            let before = g.attention_kernel();
            g.set_attention_kernel(AttentionKernel::Reference)
                .map_err(|e| e.to_string())?;
            let out = case.run(g).map_err(|e| format!("gpu: {e}"));
            g.set_attention_kernel(before).map_err(|e| e.to_string())?;
            out
        })
    }
}
