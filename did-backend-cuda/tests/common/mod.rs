//! The differential harness: one case, written once over `B: Backend`, runs
//! on the CPU backend (the oracle) and on the CUDA backend in both precisions;
//! every output is compared element by element with per-precision tolerances.
//! Without CUDA each test prints `SKIP (no CUDA)` and passes, unless
//! `DID_REQUIRE_CUDA=1`.

#![allow(dead_code)]

use std::sync::{Mutex, OnceLock};

use did_backend_cpu::CpuBackend;
use did_backend_cuda::{probe, AttentionKernel, CudaBackend, CudaOptions, Precision};
use did_core::backend::{Backend, Slice};
use did_core::rng::{Purpose, RngStream};

/// `|gpu − cpu| ≤ atol·max(1, max|cpu|) + rtol·|cpu|`, per output.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub rtol: f32,
    pub atol: f32,
}

/// f32 mode: the f32 mode's parity tolerance, rtol ≈ 1e-4 (README, GPU).
pub const F32: Tol = Tol {
    rtol: 1e-4,
    atol: 1e-5,
};
/// bf16 storage: inputs and outputs rounded to 8 bits of mantissa.
pub const BF16: Tol = Tol {
    rtol: 3e-2,
    atol: 3e-2,
};

/// An op under test, written once for every backend. Outputs are named.
pub trait Case {
    fn run<B: Backend>(&self, be: &B) -> Result<Vec<(&'static str, Vec<f32>)>, B::Error>;
}

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

/// Compares two outputs; `Err` names the worst element.
pub fn compare(what: &str, cpu: &[f32], gpu: &[f32], tol: Tol) -> Result<(), String> {
    if cpu.len() != gpu.len() {
        return Err(format!(
            "{what}: {} elements on the CPU, {} on the GPU",
            cpu.len(),
            gpu.len()
        ));
    }
    let scale = cpu.iter().fold(
        1.0f32,
        |m, x| if x.is_finite() { m.max(x.abs()) } else { m },
    );
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&c, &g)) in cpu.iter().zip(gpu).enumerate() {
        let ok = if c.is_finite() {
            (g - c).abs() <= tol.atol * scale + tol.rtol * c.abs()
        } else {
            c.to_bits() == g.to_bits() || (c.is_nan() && g.is_nan())
        };
        if !ok {
            let excess = (g - c).abs() / (tol.atol * scale + tol.rtol * c.abs());
            if worst.is_none_or(|(_, e)| excess > e || excess.is_nan()) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, excess)) => {
            let bad = cpu
                .iter()
                .zip(gpu)
                .filter(|(c, g)| {
                    (*g - *c).abs() > tol.atol * scale + tol.rtol * c.abs()
                        || (c.is_finite() != g.is_finite())
                })
                .count();
            Err(format!(
                "{what}: {bad} of {} elements out of tolerance; worst at {i}: cpu {} gpu {} ({excess:.1}× the tolerance {tol:?}, scale {scale})",
                cpu.len(),
                cpu[i],
                gpu[i]
            ))
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

/// Uniform values in (−scale, scale), reproducible from `seed`, rounded to
/// bf16 so that both precisions start from exactly the inputs the CPU sees
/// (what is compared is then the kernels' arithmetic, not input rounding).
pub fn rand(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let s = RngStream::new(seed, Purpose::Init, 11, 5);
    (0..n)
        .map(|i| {
            let x = ((2.0 * s.uniform((i >> 30) as u32, i as u32) - 1.0) as f32) * scale;
            bf16_round(x)
        })
        .collect()
}

/// Downloads `len` elements.
pub fn down<B: Backend>(be: &B, buf: &B::Buffer, len: usize) -> Result<Vec<f32>, B::Error> {
    down_at(be, buf, 0, len)
}

/// Downloads `len` elements from `offset` on.
pub fn down_at<B: Backend>(
    be: &B,
    buf: &B::Buffer,
    offset: usize,
    len: usize,
) -> Result<Vec<f32>, B::Error> {
    let mut out = vec![0.0; len];
    be.download(Slice::at(buf, offset), &mut out)?;
    Ok(out)
}

/// A buffer poisoned with NaN, to catch elements an op should write and does not.
pub fn poisoned<B: Backend>(be: &B, len: usize) -> Result<B::Buffer, B::Error> {
    be.upload(&vec![f32::NAN; len])
}

pub fn dims(a: u8, lo: usize, hi: usize) -> usize {
    lo + a as usize % (hi - lo + 1)
}

/// `x` rounded to the nearest bf16 (inputs both precisions represent exactly).
pub fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}
