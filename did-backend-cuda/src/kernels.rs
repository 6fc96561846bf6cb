//! The kernel sources and how they are compiled: once per process, with
//! NVRTC, for the device's compute capability. The compile gate (CI, no GPU)
//! compiles them through [`compile`] too, so what CI checks is what runs.

use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::{CudaError, Precision};

/// Included at the top of every source (NVRTC sees no include paths).
const COMMON: &str = include_str!("../kernels/common.cuh");

/// Every kernel source file: its name and text.
pub const SOURCES: [(&str, &str); 5] = [
    ("elementwise.cu", include_str!("../kernels/elementwise.cu")),
    ("linear.cu", include_str!("../kernels/linear.cu")),
    ("norm.cu", include_str!("../kernels/norm.cu")),
    ("attention.cu", include_str!("../kernels/attention.cu")),
    ("sample.cu", include_str!("../kernels/sample.cu")),
];

/// The full text NVRTC compiles for one source in one precision.
pub fn full_source(precision: Precision, source: &str) -> String {
    let define = match precision {
        Precision::F32 => "",
        Precision::Bf16 => "#define STORAGE_BF16 1\n",
    };
    format!("{define}{COMMON}\n{source}")
}

/// The NVRTC target for a compute capability, e.g. `compute_90` for (9, 0).
pub fn arch_for(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        // Unknown to this table: NVRTC accepts the name if it knows the chip.
        _ => Box::leak(format!("compute_{major}{minor}").into_boxed_str()),
    }
}

/// Compiles one source for `arch` (e.g. `compute_90`) in `precision`.
pub fn compile(
    precision: Precision,
    name: &'static str,
    source: &str,
    arch: &'static str,
) -> Result<Ptx, CudaError> {
    let opts = CompileOptions {
        arch: Some(arch),
        // Exact division and square roots, no flush to zero: f32 mode is
        // checked against the CPU at rtol 1e-4.
        use_fast_math: Some(false),
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(true),
        options: vec!["--std=c++17".into()],
        name: Some(name.into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(full_source(precision, source), opts).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        CudaError::Compile {
            source_name: name,
            log,
        }
    })
}
