//! Kernels under CPU emulation (tests/emulate): compiled as C++ with a shim for the CUDA
//! features they use, run, and compared with plain f64 references or with the kernels they
//! replace. Runs without a GPU, so the flash kernels' indexing, masking, tile skipping, online
//! softmax and tensor-core fragments, and the fused forwards' equality with the calls they
//! replace, are checked on every CI run; the GPU itself is checked by `scripts/gpu-check.sh`.
//!
//! Needs a C++20 compiler (`CXX`, else `c++`): `apt install g++` where it is missing.

use std::path::PathBuf;
use std::process::Command;

/// Compiles `source` (in tests/emulate) with `defines`, runs it and returns its report; fails
/// the test when it does not build or reports a disagreement.
fn build_and_run(source: &str, defines: &[&str], exe_name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/emulate");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(exe_name);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Werror"])
        .args(defines)
        .arg("-o")
        .arg(&exe)
        .arg(dir.join(source))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the C++ compiler `{cxx}` ({e}): install g++ or set CXX")
        });
    assert!(
        build.status.success(),
        "the emulated kernels of {source} do not compile:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the emulated {source} ({e})"));
    let report = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{source} {defines:?}:\n{report}");
    assert!(
        run.status.success(),
        "an emulated kernel of {source} disagrees:\n{report}"
    );
    report
}

#[test]
fn attention_kernels_agree_with_plain_attention_and_its_gradients_under_emulation() {
    let report = build_and_run("attention.cpp", &[], "emulated_attention");
    for kernel in ["attention_forward_flash", "attention_backward_flash"] {
        assert!(
            report.contains(&format!("ok   {kernel}")),
            "{kernel} did not run:\n{report}"
        );
    }
}

#[test]
fn fused_forwards_equal_the_kernels_they_replace_under_emulation() {
    for (defines, exe) in [
        (&[][..], "emulated_fused_f32"),
        (&["-DSTORAGE_BF16"][..], "emulated_fused_bf16"),
    ] {
        let report = build_and_run("fused.cpp", defines, exe);
        assert_eq!(report.matches("ok   ").count(), 8, "{report}");
    }
}
