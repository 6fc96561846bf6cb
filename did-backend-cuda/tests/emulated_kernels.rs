//! The attention kernels under CPU emulation (tests/emulate): compiled as C++ with a shim for
//! the CUDA features they use, run, and compared with a plain f64 attention and its gradients. Runs without a
//! GPU, so the flash kernel's indexing, masking, tile skipping, online softmax and tensor-core
//! fragments are checked on every CI run; the GPU itself is checked by `scripts/gpu-check.sh`.
//!
//! Needs a C++20 compiler (`CXX`, else `c++`): `apt install g++` where it is missing.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn attention_kernels_agree_with_plain_attention_and_its_gradients_under_emulation() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/emulate");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emulated_attention");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(dir.join("attention.cpp"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the C++ compiler `{cxx}` ({e}): install g++ or set CXX")
        });
    assert!(
        build.status.success(),
        "the emulated kernels do not compile:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("run the emulated kernels");
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    assert!(
        run.status.success(),
        "an emulated kernel disagrees:\n{report}"
    );
    for kernel in ["attention_forward_flash", "attention_backward_flash"] {
        assert!(
            report.contains(&format!("ok   {kernel}")),
            "{kernel} did not run:\n{report}"
        );
    }
}
