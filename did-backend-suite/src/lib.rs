//! The op tests every backend runs, as burn's backend tests are: each [`Case`] is written once
//! over `B: Backend`, runs on the CPU backend (the oracle) and on the backend under test in
//! each of its configurations, and every output is compared element by element.
//!
//! A backend gets the whole suite by describing itself as a [`Harness`] and invoking
//! [`backend_suite!`] in one of its test files:
//!
//! ```ignore
//! struct MyHarness;
//! impl did_backend_suite::Harness for MyHarness { /* configurations, run */ }
//! did_backend_suite::backend_suite!(MyHarness);
//! ```
//!
//! The CUDA backend runs it in f32 and bf16 storage (`did-backend-cuda/tests/ops.rs`); the CPU
//! backend runs it on itself in f64 and with padded rows (`did-backend-cpu/tests/suite.rs`), which
//! keeps the suite itself tested where there is no GPU. Outputs an op overwrites start as NaN (an
//! unwritten element fails); outputs it accumulates into start random, the same on every backend.

use did_backend_cpu::CpuBackend;
use did_core::backend::{Backend, Slice};
use did_core::rng::{Purpose, RngStream};
use quickcheck::{QuickCheck, TestResult};

pub mod cases;

/// Named outputs of one run of a case.
pub type Out = Vec<(&'static str, Vec<f32>)>;

/// `|got − cpu| ≤ atol·max(1, max|cpu|) + rtol·|cpu|`, per output.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    /// Relative tolerance.
    pub rtol: f32,
    /// Absolute tolerance, scaled by the output's largest magnitude.
    pub atol: f32,
}

/// Storage in f32: the CUDA f32 mode's parity tolerance, rtol ≈ 1e-4 (README, GPU).
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
    /// Runs the op on `be` and downloads its outputs.
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error>;
}

/// How a configuration stores tensors, which sets the tolerance a case holds it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// f32 (or wider): held to a case's f32 tolerance.
    F32,
    /// bf16: held to a case's bf16 tolerance, and skipped by a case that has none.
    Bf16,
}

/// A backend under test, in the configurations it is checked in.
pub trait Harness: 'static {
    /// Whether the backend is usable here. Without it a test prints `SKIP` and passes (or
    /// panics where the harness requires the backend).
    fn available(test: &str) -> bool;
    /// The configurations: a name for messages, and the storage each compares at.
    fn configurations() -> Vec<(&'static str, Storage)>;
    /// Runs `case` in configuration `index` of [`Harness::configurations`]; an error as text.
    fn run<C: Case>(index: usize, case: &C) -> Result<Out, String>;
}

/// Runs `case` on the CPU and in every configuration of `H`, and compares.
pub fn check<H: Harness, C: Case>(
    label: &str,
    case: &C,
    f32_tol: Tol,
    bf16_tol: Option<Tol>,
) -> Result<(), String> {
    let cpu = case
        .run(&CpuBackend::new())
        .map_err(|e| format!("{label}: cpu: {e}"))?;
    for (i, (name, storage)) in H::configurations().into_iter().enumerate() {
        let tol = match (storage, bf16_tol) {
            (Storage::F32, _) => f32_tol,
            (Storage::Bf16, Some(t)) => t,
            (Storage::Bf16, None) => continue,
        };
        let out = H::run(i, case).map_err(|e| format!("{label} {name}: {e}"))?;
        for ((output, c), (_, g)) in cpu.iter().zip(&out) {
            compare(&format!("{label} {name} {output}"), c, g, tol)?;
        }
    }
    Ok(())
}

/// Runs `case` in every configuration of `H`: its outputs are the fused calls' and then the
/// same number of the composed calls', which must be equal bit for bit.
pub fn fused_equals_composed<H: Harness, C: Case>(label: &str, case: &C) -> Result<(), String> {
    for (i, (name, _)) in H::configurations().into_iter().enumerate() {
        let out = H::run(i, case).map_err(|e| format!("{label} {name}: {e}"))?;
        let (fused, composed) = out.split_at(out.len() / 2);
        for ((output, f), (_, c)) in fused.iter().zip(composed) {
            let differ = f
                .iter()
                .zip(c)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            if let Some(k) = differ {
                return Err(format!(
                    "{label} {name} {output}[{k}]: fused {} ≠ composed {}",
                    f[k], c[k]
                ));
            }
        }
    }
    Ok(())
}

/// Compares two outputs; `Err` names the worst element.
pub fn compare(what: &str, cpu: &[f32], got: &[f32], tol: Tol) -> Result<(), String> {
    if cpu.len() != got.len() {
        return Err(format!(
            "{what}: {} elements on the CPU, {} under test",
            cpu.len(),
            got.len()
        ));
    }
    let scale = cpu.iter().fold(
        1.0f32,
        |m, x| if x.is_finite() { m.max(x.abs()) } else { m },
    );
    let bound = |c: f32| tol.atol * scale + tol.rtol * c.abs();
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&c, &g)) in cpu.iter().zip(got).enumerate() {
        let ok = if c.is_finite() {
            (g - c).abs() <= bound(c)
        } else {
            c.to_bits() == g.to_bits() || (c.is_nan() && g.is_nan())
        };
        if !ok {
            let excess = (g - c).abs() / bound(c);
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
                .zip(got)
                .filter(|(c, g)| (*g - *c).abs() > bound(**c) || (c.is_finite() != g.is_finite()))
                .count();
            Err(format!(
                "{what}: {bad} of {} elements out of tolerance; worst at {i}: cpu {} got {} ({excess:.1}× the tolerance {tol:?}, scale {scale})",
                cpu.len(),
                cpu[i],
                got[i]
            ))
        }
    }
}

/// Uniform values in (−scale, scale), reproducible from `seed`, rounded to bf16 so that every
/// storage starts from exactly the inputs the CPU sees (what is compared is then the ops'
/// arithmetic, not input rounding).
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

/// A size in `lo..=hi` from a quickcheck byte.
pub fn dims(a: u8, lo: usize, hi: usize) -> usize {
    lo + a as usize % (hi - lo + 1)
}

/// `x` rounded to the nearest bf16 (inputs both precisions represent exactly).
pub fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Runs a property over `tests` random inputs (up to ten times as many tries).
pub fn qc(tests: u64, f: fn(u8, u8, u8, u64) -> TestResult) {
    QuickCheck::new()
        .tests(tests)
        .max_tests(10 * tests)
        .quickcheck(f);
}

/// A check's result as quickcheck's.
pub fn verdict(r: Result<(), String>) -> TestResult {
    match r {
        Ok(()) => TestResult::passed(),
        Err(e) => TestResult::error(e),
    }
}
