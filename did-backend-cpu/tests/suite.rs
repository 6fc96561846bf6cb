//! The shared op suite (did-backend-suite) on the CPU backend itself, against its f32 default:
//! in f64 (the arithmetic every f32 result must be close to) and in f32 with every logits-style
//! row padded to 64 elements (the layout a GPU asks for). Where there is no GPU this is what
//! keeps the suite's own cases running.

use did_backend_cpu::CpuBackend;
use did_backend_suite::{Case, Harness, Out, Storage};

struct CpuHarness;

impl Harness for CpuHarness {
    fn available(_test: &str) -> bool {
        true
    }

    fn configurations() -> Vec<(&'static str, Storage)> {
        vec![
            ("f64", Storage::F32),
            ("f32 rows padded to 64", Storage::F32),
        ]
    }

    fn run<C: Case>(index: usize, case: &C) -> Result<Out, String> {
        match index {
            0 => case.run(&CpuBackend::<f64>::with_float()),
            _ => case.run(&CpuBackend::new().with_row_alignment(64)),
        }
        .map_err(|e| e.to_string())
    }
}

did_backend_suite::backend_suite!(CpuHarness);
