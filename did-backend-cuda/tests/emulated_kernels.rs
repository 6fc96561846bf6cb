//! Kernels under CPU emulation (tests/emulate): compiled as C++ with a shim for the CUDA
//! features they use, run, and compared with plain f64 references or with the kernels they
//! replace. Runs without a GPU, so the flash kernels' indexing, masking, tile skipping, online
//! softmax and tensor-core fragments, and the fused forwards' equality with the calls they
//! replace, are checked on every CI run; the GPU itself is checked by `scripts/gpu-check.sh`.
//!
//! Needs a C++20 compiler (`CXX`, else `c++`): `apt install g++` where it is missing.
//!
//! Two faults a GPU has and a CPU hides are brought out: shared memory starts each block
//! poisoned (emu.h; a dK/dV pre-pass that left unseen tiles unwritten, trusting zeros, passed
//! before and fails now), and `DID_EMULATE_SANITIZE=address` also runs a build with
//! AddressSanitizer, so a read or write past a buffer — which a GPU faults on or reads garbage
//! from — fails the test (a column bound one past the end in the few-rows kernel passed the
//! plain build and fails that one); `address,undefined` adds UndefinedBehaviorSanitizer (signed
//! overflow in index arithmetic, misaligned accesses), every finding fatal. CI sets the latter.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles `source` (in tests/emulate) with `defines`, runs it and returns its report; fails
/// the test when it does not build or reports a disagreement. With `DID_EMULATE_SANITIZE`, the
/// sanitized build runs too and must report the same `ok` lines.
fn build_and_run(source: &str, defines: &[&str], exe_name: &str) -> String {
    let mut reports: Vec<String> = builds(source, defines, exe_name)
        .iter()
        .map(|exe| run(exe, source, defines, &[]))
        .collect();
    let oks = |r: &str| -> Vec<String> {
        r.lines()
            .filter(|l| l.starts_with("ok"))
            .map(String::from)
            .collect()
    };
    for sanitized in &reports[1..] {
        assert_eq!(
            oks(sanitized),
            oks(&reports[0]),
            "{source} {defines:?}: the sanitized build's report differs"
        );
    }
    reports.swap_remove(0)
}

/// The compiler flags `DID_EMULATE_SANITIZE` asks for, if any.
fn sanitizer_flags() -> Option<&'static [&'static str]> {
    match std::env::var("DID_EMULATE_SANITIZE").as_deref() {
        Ok("address") => Some(&["-fsanitize=address", "-fno-omit-frame-pointer"]),
        Ok("address,undefined") => Some(&[
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ]),
        Ok(other) if !other.is_empty() => panic!(
            "DID_EMULATE_SANITIZE={other:?}: expected `address` or `address,undefined` (or unset)"
        ),
        _ => None,
    }
}

/// The emulations of `source` to run: the plain build, whose shared memory starts each block
/// poisoned (emu.h), and with `DID_EMULATE_SANITIZE` a sanitized one, whose shared arrays are
/// plain statics so that AddressSanitizer checks their bounds (it skips the poisoned build's
/// named section).
fn builds(source: &str, defines: &[&str], exe_name: &str) -> Vec<PathBuf> {
    let mut exes = vec![build(source, defines, &[], exe_name)];
    if let Some(flags) = sanitizer_flags() {
        exes.push(build(
            source,
            defines,
            flags,
            &format!("{exe_name}_sanitized"),
        ));
    }
    exes
}

/// Compiles `source` (in tests/emulate) with `defines` and `flags` into `exe_name`.
fn build(source: &str, defines: &[&str], flags: &[&str], exe_name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/emulate");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(exe_name);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let build = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-Wall",
            "-Werror",
            "-fno-weak",
        ])
        .args(flags)
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
    exe
}

/// Runs an emulation binary with `args`; fails the test when it reports a disagreement.
fn run(exe: &Path, source: &str, defines: &[&str], args: &[&Path]) -> String {
    let run = Command::new(exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the emulated {source} ({e})"));
    let report = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{source} {defines:?}:\n{report}");
    assert!(
        run.status.success(),
        "an emulated kernel of {source} disagrees:\n{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    report
}

#[test]
fn attention_kernels_agree_with_plain_attention_and_its_gradients_under_emulation() {
    let report = build_and_run("attention.cpp", &[], "emulated_attention");
    for kernel in [
        "attention_forward_flash",
        "attention_backward_flash",
        "attention_forward_flash split",
    ] {
        assert!(
            report.contains(&format!("ok   {kernel}")),
            "{kernel} did not run:\n{report}"
        );
    }
}

#[test]
fn fused_forwards_and_chunked_rope_equal_the_kernels_they_replace_under_emulation() {
    for (defines, exe) in [
        (&[][..], "emulated_fused_f32"),
        (&["-DSTORAGE_BF16"][..], "emulated_fused_bf16"),
    ] {
        let report = build_and_run("fused.cpp", defines, exe);
        assert_eq!(report.matches("ok   ").count(), 58, "{report}");
    }
}

#[test]
fn chunked_elementwise_kernels_and_batched_column_sums_equal_their_plain_forms_under_emulation() {
    for (defines, exe) in [
        (&[][..], "emulated_chunked_f32"),
        (&["-DSTORAGE_BF16"][..], "emulated_chunked_bf16"),
    ] {
        let report = build_and_run("chunked.cpp", defines, exe);
        // One line per chunked kernel (`Kernel::chunked`) but the optimizer's two (optimizer.cpp),
        // gated and ungated residuals apart, the out-of-place one with and without a bias; six
        // flat kernels again over a length with a tail; the sum of squares over both lengths,
        // the column sums and the padded rows.
        assert_eq!(
            report.matches("ok   ").count(),
            did_backend_cuda::kernel::Kernel::ALL
                .iter()
                .filter(|k| k.chunked())
                .count()
                - 2
                + 2
                + 6
                + 4,
            "{report}"
        );
    }
}

#[test]
fn the_optimizer_update_keeps_f32_masters_and_equals_the_kernels_it_replaces_under_emulation() {
    for (defines, exe, lines) in [
        (&[][..], "emulated_optimizer_f32", 7),
        (&["-DSTORAGE_BF16"][..], "emulated_optimizer_bf16", 7),
    ] {
        let report = build_and_run("optimizer.cpp", defines, exe);
        assert_eq!(report.matches("ok   ").count(), lines, "{report}");
    }
}

#[test]
fn the_few_rows_linear_forward_matches_the_f64_product_under_emulation() {
    for (defines, exe) in [
        (&[][..], "emulated_linear_f32"),
        (&["-DSTORAGE_BF16"][..], "emulated_linear_bf16"),
    ] {
        let report = build_and_run("linear.cpp", defines, exe);
        assert!(report.contains("17 of 17 cases"), "{report}");
    }
}

#[test]
fn layernorm_and_the_loss_match_their_f64_formulas_under_emulation() {
    for (defines, exe) in [
        (&[][..], "emulated_norm_f32"),
        (&["-DSTORAGE_BF16"][..], "emulated_norm_bf16"),
    ] {
        let report = build_and_run("norm.cpp", defines, exe);
        assert_eq!(report.matches("ok   ").count(), 7, "{report}");
    }
}

#[test]
fn embedding_backward_adds_every_row_in_the_cpus_order_under_emulation() {
    for (defines, exe) in [
        (&[][..], "emulated_embedding_f32"),
        (&["-DSTORAGE_BF16"][..], "emulated_embedding_bf16"),
    ] {
        let report = build_and_run("embedding.cpp", defines, exe);
        assert_eq!(
            report.matches("ok   embedding_backward").count(),
            5,
            "{report}"
        );
    }
}

// ---- token drawing -----------------------------------------------------------------------------

use did_backend_cuda::draw::{certified_token, stream_words};
use did_core::rng::{Purpose, RngStream};
use did_core::sample::categorical::{draw_token, DrawScratch, SampledToken};
use did_core::sample::nucleus::{Nucleus, NucleusRule};
use did_core::sample::DrawSpec;

/// One launch of the emulated `draw_tokens`: rows of logits under one nucleus.
struct DrawLaunch {
    name: &'static str,
    vocab: usize,
    mask_id: u32,
    nucleus: Nucleus,
    logits: Vec<f32>,
    /// Rows whose draw must be left to the host (decisions on a knife's edge).
    uncertain: Vec<usize>,
}

/// A standard normal from the test's own stream (Box–Muller).
fn normal(s: &RngStream, row: u32, i: u32) -> f32 {
    let (u, v) = (s.uniform(row, 2 * i), s.uniform(row, 2 * i + 1));
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

/// Gaussian logits with a standard deviation per row, rounded by `round`.
fn gaussian_rows(seed: u64, vocab: usize, sigmas: &[f32], round: impl Fn(f32) -> f32) -> Vec<f32> {
    let s = RngStream::new(seed, Purpose::Init, 0, 0);
    let mut out = Vec::new();
    for (r, &sigma) in sigmas.iter().enumerate() {
        out.extend((0..vocab as u32).map(|i| round(sigma * normal(&s, r as u32, i))));
    }
    out
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Runs one launch through `exe` and returns, per row, what the kernel drew (`None`: left to
/// the host).
fn emulated_draws(
    exe: &Path,
    launch: &DrawLaunch,
    draws: &[DrawSpec],
    threads: i32,
) -> Vec<Option<SampledToken>> {
    let rows = draws.len();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (input, output) = (
        dir.join(format!("draw-{}.in", launch.name)),
        dir.join(format!("draw-{}.out", launch.name)),
    );
    let mut bytes = Vec::new();
    bytes.extend((rows as u64).to_le_bytes());
    bytes.extend((launch.vocab as u64).to_le_bytes());
    bytes.extend(i64::from(launch.mask_id).to_le_bytes());
    bytes.extend(launch.nucleus.p().to_le_bytes());
    bytes.extend(i32::from(launch.nucleus.rule() == NucleusRule::SmallestCover).to_le_bytes());
    bytes.extend(threads.to_le_bytes());
    bytes.extend(launch.logits.iter().flat_map(|x| x.to_le_bytes()));
    bytes.extend(
        draws
            .iter()
            .flat_map(stream_words)
            .flat_map(u32::to_le_bytes),
    );
    std::fs::write(&input, bytes).unwrap();
    run(exe, "sample.cpp", &[launch.name], &[&input, &output]);
    let got = std::fs::read(&output).unwrap();
    assert_eq!(
        got.len(),
        rows * (2 * 4 + 3 * 8),
        "{}: output size",
        launch.name
    );
    let word = |i: usize| u32::from_le_bytes(got[4 * i..4 * i + 4].try_into().unwrap());
    let float = |i: usize| {
        let at = rows * 8 + 8 * i;
        f64::from_le_bytes(got[at..at + 8].try_into().unwrap())
    };
    (0..rows)
        .map(|r| {
            certified_token(
                [word(2 * r), word(2 * r + 1)],
                [float(3 * r), float(3 * r + 1), float(3 * r + 2)],
            )
        })
        .collect()
}

#[test]
fn device_token_draws_are_the_hosts_or_left_to_it_under_emulation() {
    let vocab = 3000;
    let sigmas = [0.5, 1.0, 2.0, 3.0, 6.0, 12.0];
    let bd3 = |p| Nucleus::new(p, NucleusRule::Bd3).unwrap();
    let cover = |p| Nucleus::new(p, NucleusRule::SmallestCover).unwrap();
    // Logits with a few awkward entries: [MASK] highest, NaN, ±∞, −0.
    let mut awkward = gaussian_rows(5, vocab, &[2.0, 2.0], |x| x);
    for row in awkward.chunks_mut(vocab) {
        row[vocab - 1] = 40.0; // [MASK]
        row[3] = f32::NAN;
        row[4] = f32::INFINITY;
        row[5] = f32::NEG_INFINITY;
        row[6] = -0.0;
        row[7] = 0.0;
    }
    // A tail whose probabilities underflow: exp(x − max) is subnormal down to about −745 and 0
    // below, so the kernel's shortcut for "p > 0" (no exp above −700) and its exact test below
    // must both agree with the host's.
    let mut underflow = gaussian_rows(10, vocab, &[2.0, 2.0], |x| x);
    for row in underflow.chunks_mut(vocab) {
        for (i, x) in row.iter_mut().enumerate().skip(40) {
            *x = -680.0 - 80.0 * (i as f32 / vocab as f32);
        }
    }
    // Every logit equal: the nucleus cuts inside one tie group, by id. With 1,001 tokens
    // (1,000 besides [MASK]) 0.9 falls exactly on a cut, the case the kernel leaves to the host.
    let flat = |n: usize| vec![0.25f32; n];
    let launches = [
        DrawLaunch {
            name: "gaussian-bd3-0.9",
            vocab,
            mask_id: 0,
            nucleus: bd3(0.9),
            logits: gaussian_rows(1, vocab, &sigmas, |x| x),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "gaussian-cover-0.9",
            vocab,
            mask_id: 17,
            nucleus: cover(0.9),
            logits: gaussian_rows(2, vocab, &sigmas, |x| x),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "gaussian-bd3-0.5",
            vocab,
            mask_id: 2999,
            nucleus: bd3(0.5),
            logits: gaussian_rows(3, vocab, &sigmas, |x| x),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "gaussian-top-only",
            vocab,
            mask_id: 2999,
            nucleus: bd3(1e-4),
            logits: gaussian_rows(3, vocab, &sigmas, |x| x),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "gaussian-no-nucleus",
            vocab,
            mask_id: 2999,
            nucleus: bd3(1.0),
            logits: gaussian_rows(4, vocab, &sigmas, |x| x),
            uncertain: vec![],
        },
        // Coarse logits: large tie groups on both sides of the cut.
        DrawLaunch {
            name: "coarse-ties-bd3-0.9",
            vocab,
            mask_id: 2999,
            nucleus: bd3(0.9),
            logits: gaussian_rows(6, vocab, &sigmas, |x| (4.0 * x).round() / 4.0),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "coarse-ties-cover-0.7",
            vocab,
            mask_id: 2999,
            nucleus: cover(0.7),
            logits: gaussian_rows(7, vocab, &sigmas, |x| (2.0 * x).round() / 2.0),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "bf16-bd3-0.9",
            vocab,
            mask_id: 2999,
            nucleus: bd3(0.9),
            logits: gaussian_rows(8, vocab, &sigmas, bf16),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "awkward-bd3-0.9",
            vocab,
            mask_id: (vocab - 1) as u32,
            nucleus: bd3(0.9),
            logits: awkward,
            uncertain: vec![],
        },
        DrawLaunch {
            name: "underflowing-tail-bd3-0.9",
            vocab,
            mask_id: 0,
            nucleus: bd3(0.9),
            logits: underflow.clone(),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "underflowing-tail-no-nucleus",
            vocab,
            mask_id: 0,
            nucleus: bd3(1.0),
            logits: underflow,
            uncertain: vec![],
        },
        DrawLaunch {
            name: "flat-3000",
            vocab,
            mask_id: 0,
            nucleus: bd3(0.9),
            logits: flat(vocab),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "flat-1001-on-the-cut",
            vocab: 1001,
            mask_id: 1000,
            nucleus: bd3(0.9),
            logits: flat(1001),
            uncertain: vec![0],
        },
        // −0 and +0 have one probability: the host ranks them by id, so must the kernel.
        DrawLaunch {
            name: "signed-zeros",
            vocab: 5,
            mask_id: 4,
            nucleus: bd3(0.6),
            logits: [-0.0, 0.0, 0.0, -0.0, 0.0].repeat(16),
            uncertain: vec![],
        },
        DrawLaunch {
            name: "no-finite-logit",
            vocab: 64,
            mask_id: 0,
            nucleus: bd3(0.9),
            logits: vec![f32::NEG_INFINITY; 64],
            uncertain: vec![0],
        },
        // The real vocabulary, in the block size the backend launches.
        DrawLaunch {
            name: "gpt2-vocabulary",
            vocab: 50_258,
            mask_id: 50_257,
            nucleus: bd3(0.9),
            logits: gaussian_rows(9, 50_258, &[1.0, 3.0], bf16),
            uncertain: vec![],
        },
    ];
    for (defines, exe_name) in [
        (&[][..], "emulated_sample_f32"),
        (&["-DSTORAGE_BF16"][..], "emulated_sample_bf16"),
    ] {
        for exe in builds("sample.cpp", defines, exe_name) {
            let mut certified = 0;
            for launch in &launches {
                // bf16 storage holds only bf16 logits: the reference sees what the kernel reads.
                let mut launch_logits = launch.logits.clone();
                if !defines.is_empty() {
                    launch_logits.iter_mut().for_each(|x| *x = bf16(*x));
                }
                let launch = DrawLaunch {
                    logits: launch_logits,
                    uncertain: launch.uncertain.clone(),
                    ..*launch
                };
                let rows = launch.logits.len() / launch.vocab;
                let draws: Vec<DrawSpec> = (0..rows)
                    .map(|r| DrawSpec {
                        stream: RngStream::new(31, Purpose::Categorical, r as u32, 2),
                        row: 100 + r as u32,
                    })
                    .collect();
                let threads = if launch.vocab > 10_000 { 512 } else { 64 };
                let drawn = emulated_draws(&exe, &launch, &draws, threads);
                let mut scratch = DrawScratch::default();
                for (r, (device, spec)) in drawn.iter().zip(&draws).enumerate() {
                    let row = &launch.logits[r * launch.vocab..(r + 1) * launch.vocab];
                    let host = draw_token(
                        row,
                        launch.mask_id,
                        &launch.nucleus,
                        &spec.stream,
                        spec.row,
                        &mut scratch,
                    );
                    match device {
                        None => assert!(
                            launch.uncertain.contains(&r),
                            "{} {defines:?} row {r}: left to the host without cause",
                            launch.name
                        ),
                        Some(device) => {
                            assert!(
                                !launch.uncertain.contains(&r),
                                "{} {defines:?} row {r}: certified on a knife's edge",
                                launch.name
                            );
                            assert_eq!(
                                device.id, host.id,
                                "{} {defines:?} row {r}: token",
                                launch.name
                            );
                            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
                            let (d, h) = (device.confidence, host.confidence);
                            assert!(
                                close(d.nucleus, h.nucleus)
                                    && close(d.raw, h.raw)
                                    && close(d.max, h.max),
                                "{} {defines:?} row {r}: confidences {d:?} vs the host's {h:?}",
                                launch.name
                            );
                            certified += 1;
                        }
                    }
                }
            }
            println!("{defines:?} {exe:?}: {certified} rows certified and equal to draw_token");
        }
    }
}
