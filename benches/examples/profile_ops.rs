//! Where a backend spends a BD3 training step and a draft → refine sampling run, per op, each
//! op synchronized so that a GPU's times are the ops' and not their launches'. Written as a
//! markdown section (stdout, and OUT when given): `scripts/gpu-bench.sh` puts it beside its
//! figures, so a missed target comes with the ops that hold it back.
//!
//! Run: `cargo run --release -p did-benches --example profile_ops -- [OUT.md]`
//!
//! Settings (environment): BACKEND (cpu | cuda; cpu), PRECISION (f32 | bf16; f32), PRESET
//! (tiny | small; tiny), BATCH (2), LENGTH (the preset's context), STEPS (2, after one warm-up),
//! SAMPLE_BATCHES ("1"), SAMPLE_LENGTH (64), STAGES (4,L:0.25), GEMM_ALIGNMENT (1 on a GPU, 0 on
//! the CPU: the head's three GEMMs with the vocabulary's own row stride, one rounded up to 64,
//! and the vocabulary itself padded to 64: whether padding the head's weight would pay too),
//! DRAFT_ATTENTION (1 on a GPU in bf16: a draft call's attention forward at growing KV caches
//! with the key tiles whole and split between blocks, `did_backend_cuda::key_split`), FEW_ROWS
//! (1 on a GPU in bf16: the draft's linear forwards over 1–8 rows on cuBLAS and on the few-rows
//! kernel, `did_backend_cuda::few_rows`). DID_CUDA_ATTENTION, DID_CUDA_DRAW, DID_CUDA_KEY_SPLIT
//! and DID_CUDA_FEW_ROWS choose the kernels, as for `did` (`CudaOptions::from_vars`).

use did_core::backend::prelude::*;
use std::fmt::Write as _;
use std::time::Instant;

use did_backend_cpu::CpuBackend;
use did_backend_cuda::{CudaBackend, CudaOptions, Precision};
use did_benches::profile::Profiled;
use did_core::backend::{Backend, Gemm, Slice, SliceMut};
use did_core::model::{
    diffusion_batch, loss_rows_for, Architecture, DiffusionDenoiser, ModelConfig, Trainer,
    TrainerConfig, Transformer,
};
use did_core::refine::{generate, GenerateConfig, StagePlan};
use did_core::rng::{Purpose, RngStream};
use did_core::schedule::TrainingSchedule;

type Failure = Box<dyn std::error::Error>;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> Result<T, Failure> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a valid value").into()),
        Err(_) => Ok(default),
    }
}

/// A yes/no setting: `1` or `true`, `0` or `false`.
fn flag(name: &str, default: bool) -> Result<bool, Failure> {
    match setting(name, String::new())?.as_str() {
        "" => Ok(default),
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        other => Err(format!("{name}={other:?}: expected 1 or 0").into()),
    }
}

fn main() -> Result<(), Failure> {
    let out = std::env::args().nth(1);
    let backend = setting("BACKEND", "cpu".to_string())?;
    let precision = setting("PRECISION", "f32".to_string())?;
    let report = match (backend.as_str(), precision.as_str()) {
        ("cpu", "f32") => profile(Profiled::new(CpuBackend::new()).by_gemm_shape())?,
        ("cuda", p @ ("f32" | "bf16")) => {
            let p = if p == "f32" {
                Precision::F32
            } else {
                Precision::Bf16
            };
            let options = CudaOptions::from_vars(|name| std::env::var(name).ok())?;
            let be = CudaBackend::with_options(0, p, options)?;
            // First and written at once (a few hundred milliseconds): a profile cut short by
            // its time limit still leaves this table.
            let mut draft = String::new();
            if flag("FEW_ROWS", p == Precision::Bf16)? {
                few_rows_gemms(&be, &mut draft)?;
            }
            if flag("DRAFT_ATTENTION", p == Precision::Bf16)? {
                draft_attention(&be, &mut draft)?;
                if let Some(path) = &out {
                    std::fs::write(path, &draft)
                        .map_err(|e| format!("cannot write {path}: {e}"))?;
                }
            }
            let mut report = profile(Profiled::synchronized(be).by_gemm_shape())?;
            report.push_str(&draft);
            report
        }
        other => {
            return Err(format!(
                "BACKEND, PRECISION = {other:?}: expected cpu f32, cuda f32 or cuda bf16"
            )
            .into())
        }
    };
    print!("{report}");
    if let Some(path) = out {
        std::fs::write(&path, &report).map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    Ok(())
}

/// The op table of everything `be` timed since its last reset, with `total` seconds of wall time.
fn table<B: Backend>(be: &Profiled<B>, total: f64, out: &mut String) {
    let mut times: Vec<_> = be.times().into_iter().collect();
    times.sort_by_key(|t| std::cmp::Reverse(t.1.time));
    let timed: f64 = times.iter().map(|t| t.1.time.as_secs_f64()).sum();
    let _ = writeln!(out, "| op | calls | ms | share | µs / call | TFLOP/s |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for (op, t) in &times {
        let s = t.time.as_secs_f64();
        let tflops = if t.flops > 0 && s > 0.0 {
            format!("{:.1}", t.flops as f64 / s / 1e12)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| `{op}` | {} | {:.2} | {:.1} % | {:.1} | {tflops} |",
            t.calls,
            s * 1e3,
            100.0 * s / timed.max(1e-12),
            s * 1e6 / t.calls.max(1) as f64
        );
    }
    let (gemm_s, gemm_flops) = times
        .iter()
        .filter(|t| t.0.starts_with("matmul"))
        .fold((0.0, 0u64), |(s, f), t| {
            (s + t.1.time.as_secs_f64(), f + t.1.flops)
        });
    let _ = writeln!(
        out,
        "\nWall {:.1} ms; inside ops {:.1} ms (matmuls {:.1} ms at {:.1} TFLOP/s); between ops (host work) {:.1} ms.\n",
        total * 1e3,
        timed * 1e3,
        gemm_s * 1e3,
        gemm_flops as f64 / gemm_s.max(1e-12) / 1e12,
        (total - timed).max(0.0) * 1e3
    );
}

fn profile<B: Backend>(be: Profiled<B>) -> Result<String, Failure>
where
    B::Error: std::error::Error + 'static,
{
    let preset = setting("PRESET", "tiny".to_string())?;
    let config = ModelConfig::preset(&preset, Architecture::Dit)?;
    let batch = setting("BATCH", 2usize)?;
    let length = setting("LENGTH", config.context)?;
    let steps = setting("STEPS", 2usize)?;
    let sample_batches = setting("SAMPLE_BATCHES", "1".to_string())?;
    let sample_length = setting("SAMPLE_LENGTH", 64usize)?;
    let stages = setting("STAGES", "4,L:0.25".to_string())?;
    let model = Transformer::new(config)?;
    let init = model.table().random_values(1, 0.05);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Op profile: {} ({preset}, every op synchronized)\n",
        be.name()
    );

    // ---- training: BD3 at block 4 -------------------------------------------------------------
    let mut trainer = Trainer::new(&be, &model, TrainerConfig::default(), &init, 1)?;
    let make = |step: u32| {
        let s = RngStream::new(3, Purpose::DataOrder, 0, step);
        let x0: Vec<u32> = (0..batch * length)
            .map(|i| s.u32(0, i as u32) % config.mask_id)
            .collect();
        let schedule = TrainingSchedule::default();
        diffusion_batch(&x0, batch, length, 4, &schedule, config.mask_id, 1, step)
    };
    trainer.step(&be, &model, &[make(0)?])?; // warm-up: activations allocated, kernels loaded
    be.synchronize()?;
    be.reset();
    let start = Instant::now();
    for step in 1..=steps as u32 {
        trainer.step(&be, &model, &[make(step)?])?;
    }
    be.synchronize()?;
    let total = start.elapsed().as_secs_f64();
    let tokens = (steps * batch * length) as f64;
    let _ = writeln!(
        out,
        "### Training: {steps} BD3 steps (block 4), batch {batch} × length {length}: {:.0} tokens/s under the profiler\n",
        tokens / total
    );
    table(&be, total, &mut out);
    let params = be.upload(&init)?;
    drop(trainer);

    // ---- sampling -----------------------------------------------------------------------------
    let plan: StagePlan = stages.parse()?;
    for b in sample_batches.split_whitespace().map(str::parse::<usize>) {
        let b = b?;
        let gen = GenerateConfig::new(plan.resolve(sample_length)?, 9);
        let prompt = [did_core::GPT2_EOS];
        let prompts = vec![&prompt[..]; b];
        let mut denoiser = DiffusionDenoiser::new(&be, &model, &params, true)?;
        be.synchronize()?;
        be.reset();
        let start = Instant::now();
        let g = generate(&mut denoiser, &gen, &prompts)?;
        be.synchronize()?;
        let total = start.elapsed().as_secs_f64();
        let _ = writeln!(
            out,
            "### Sampling: stages {stages}, batch {b} × length {sample_length}, {} denoiser calls: {:.3} samples/s under the profiler\n",
            g.nfe(),
            b as f64 / total
        );
        table(&be, total, &mut out);
    }

    if flag("GEMM_ALIGNMENT", be.name().starts_with("cuda"))? {
        gemm_alignment(&be, &config, &mut out)?;
    }
    Ok(out)
}

/// Seconds a call of `run` takes on `be`: one warm-up call (cuBLAS picks its kernel), then
/// `calls` calls between two synchronizations.
fn seconds_per_call<B: Backend>(
    be: &B,
    calls: usize,
    mut run: impl FnMut() -> Result<(), B::Error>,
) -> Result<f64, B::Error> {
    run()?;
    be.synchronize()?;
    let start = Instant::now();
    for _ in 0..calls {
        run()?;
    }
    be.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / calls.max(1) as f64)
}

/// The head's GEMMs over one loss chunk (`loss_rows_for(V)` rows) three ways: the logits' row
/// stride the vocabulary (50,258: rows not 16-byte aligned in bf16); the stride rounded up to a
/// multiple of 64 (what the model does since the second H200 run, `MemoryOps::padded_row_stride`);
/// and the vocabulary itself padded to that multiple (the head's weight with zero rows added,
/// nanoGPT's 50,304: not done; this column says whether it would pay). TFLOP/s count the
/// vocabulary's useful work only.
fn gemm_alignment<B: Backend>(
    be: &Profiled<B>,
    config: &ModelConfig,
    out: &mut String,
) -> Result<(), Failure>
where
    B::Error: std::error::Error + 'static,
{
    let (v, c) = (config.vocab_size, config.hidden);
    let rows = loss_rows_for(v);
    let padded = v.next_multiple_of(64);
    let x = be.upload(&vec![0.01; rows * c])?;
    let w = be.upload(&vec![0.01; padded * c])?;
    let mut logits = be.upload(&vec![0.01; rows * padded])?;
    let mut dx = be.zeros(rows * c)?;
    let mut dw = be.zeros(padded * c)?;
    let _ = writeln!(
        out,
        "### The head's GEMMs: logits row stride {v}, stride {padded}, and the vocabulary padded to {padded} ({rows} rows × {c} → {v}; ms per call, 5 calls)\n"
    );
    let _ = writeln!(
        out,
        "| GEMM | stride {v} | stride {padded} | vocabulary {padded} | TFLOP/s at {v} | at stride {padded} | at vocabulary {padded} |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    // Which GEMM: 0 writes the logits (their stride is ldc), 1 and 2 read them (lda).
    let gemm = |which: usize, cols: usize| match which {
        0 => Gemm::linear(rows, c, cols),
        1 => Gemm::linear_input_grad(rows, c, cols),
        _ => Gemm::linear_weight_grad(rows, c, cols),
    };
    for (which, name) in [
        (0, "logits = x · Wᵀ"),
        (1, "dx = dlogits · W"),
        (2, "dW += dlogitsᵀ · x"),
    ] {
        let mut ms = [0.0f64; 3];
        for (slot, (cols, ld)) in ms.iter_mut().zip([(v, v), (v, padded), (padded, padded)]) {
            let g = if which == 0 {
                Gemm {
                    ldc: ld,
                    ..gemm(which, cols)
                }
            } else {
                Gemm {
                    lda: ld,
                    ..gemm(which, cols)
                }
            };
            let run = || -> Result<(), B::Error> {
                let l = Slice::whole(&logits);
                match which {
                    0 => be.matmul(
                        &g,
                        Slice::whole(&x),
                        Slice::whole(&w),
                        SliceMut::whole(&mut logits),
                    ),
                    1 => be.matmul(&g, l, Slice::whole(&w), SliceMut::whole(&mut dx)),
                    _ => be.matmul(&g, l, Slice::whole(&x), SliceMut::whole(&mut dw)),
                }
            };
            *slot = seconds_per_call(be, 5, run)? * 1e3;
        }
        let tflops = |ms: f64| gemm(which, v).flops() as f64 / (ms * 1e-3) / 1e12;
        let _ = writeln!(
            out,
            "| {name} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} |",
            ms[0],
            ms[1],
            ms[2],
            tflops(ms[0]),
            tflops(ms[1]),
            tflops(ms[2])
        );
    }
    let _ = writeln!(out);
    Ok(())
}

/// `small`'s linear forwards over the few rows of a draft call (the block of 4 at batch 1; the
/// head over 1 and 4 revealed rows; 8 rows), on cuBLAS and on the few-rows kernel
/// (`did_backend_cuda::few_rows`): µs a call, 50 calls after a warm-up, no profiler, with the
/// weights' size for scale (each call reads them once: ≈ 0.23 µs a MB at 4.3 TB/s). Where
/// cuBLAS is faster, `DID_CUDA_FEW_ROWS=off` (or a narrower `few_rows::kernel_for`) is right.
fn few_rows_gemms(be: &CudaBackend, out: &mut String) -> Result<(), Failure> {
    let _ = writeln!(
        out,
        "### Linear forwards over a few rows: cuBLAS against the few-rows kernel (bf16; µs a call, 50 calls)\n"
    );
    let _ = writeln!(
        out,
        "| rows × out × in | weights | cuBLAS | few-rows kernel | cuBLAS / kernel |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let before = be.few_rows_kernel();
    for (m, n, k) in [
        (4usize, 2304usize, 768usize),
        (4, 768, 768),
        (4, 3072, 768),
        (4, 768, 3072),
        (1, 50_258, 768),
        (4, 50_258, 768),
        (1, 3072, 768),
        (8, 3072, 768),
    ] {
        let g = Gemm::linear(m, k, n);
        let x = be.upload(&vec![0.01; m * k])?;
        let w = be.upload(&vec![0.01; n * k])?;
        let mut y = be.zeros(m * n)?;
        let mut us = [0.0f64; 2];
        for (slot, on) in us.iter_mut().zip([false, true]) {
            be.set_few_rows_kernel(on);
            let run = || {
                be.matmul(
                    &g,
                    Slice::whole(&x),
                    Slice::whole(&w),
                    SliceMut::whole(&mut y),
                )
            };
            *slot = seconds_per_call(be, 50, run)? * 1e6;
        }
        let _ = writeln!(
            out,
            "| {m} × {n} × {k} | {:.1} MB | {:.1} | {:.1} | {:.2} × |",
            (n * k * 2) as f64 / 1e6,
            us[0],
            us[1],
            us[0] / us[1]
        );
    }
    be.set_few_rows_kernel(before);
    let _ = writeln!(out);
    Ok(())
}

/// A draft call's attention forward (`small`'s 12 heads of 64, a block of 4 queries after a KV
/// cache) at growing caches, batch 1 and 8, with the key tiles whole (`KeySplit::Off`), a tile a
/// block, and as the backend splits them (`KeySplit::Auto`): µs a call, 50 calls after a
/// warm-up, no profiler. Where "a tile a block" beats "whole" at two or three tiles,
/// `MIN_TILES_TO_SPLIT` should come down.
fn draft_attention(be: &CudaBackend, out: &mut String) -> Result<(), Failure> {
    use did_backend_cuda::KeySplit;
    use did_core::backend::AttentionShape;
    use did_core::mask::AttentionMask;
    let (heads, head_dim, block) = (12, 64, 4);
    let width = heads * head_dim;
    let _ = writeln!(
        out,
        "### A draft call's attention forward, key tiles whole against split between blocks (12 heads × 64, block 4; µs a call, 50 calls)\n"
    );
    let _ = writeln!(
        out,
        "| batch | cached keys | key tiles | whole | a tile a block | auto | whole / auto |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|");
    let before = be.key_split();
    for batch in [1usize, 8] {
        for cached in [60usize, 124, 252, 508, 1020] {
            let kv_len = cached + block;
            let s = AttentionShape::over_cache(batch, heads, head_dim, block, kv_len, kv_len);
            let mask = AttentionMask::BlockCausal {
                block_size: block,
                query_offset: cached,
                key_offset: 0,
                window: None,
            };
            let noise = |n: usize, salt: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 7919 + salt) % 1013) as f32 / 1013.0 - 0.5) * 3.0)
                    .collect()
            };
            let q = be.upload(&noise(batch * block * 3 * width, 1))?;
            let kv = be.upload(&noise(batch * kv_len * 2 * width, 2))?;
            let mut o = be.zeros(batch * block * width)?;
            let mut lse = be.zeros_f32(batch * heads * block)?;
            let mut us = [0.0f64; 3];
            for (slot, split) in
                us.iter_mut()
                    .zip([KeySplit::Off, KeySplit::TilesPerBlock(1), KeySplit::Auto])
            {
                be.set_key_split(split);
                let run = || {
                    be.attention_forward(
                        &s,
                        &mask,
                        Slice::whole(&q),
                        Slice::at(&kv, 0),
                        Slice::at(&kv, width),
                        SliceMut::whole(&mut o),
                        SliceMut::whole(&mut lse),
                    )
                };
                *slot = seconds_per_call(be, 50, run)? * 1e6;
            }
            let _ = writeln!(
                out,
                "| {batch} | {cached} | {} | {:.1} | {:.1} | {:.1} | {:.2} × |",
                kv_len.div_ceil(64),
                us[0],
                us[1],
                us[2],
                us[0] / us[2]
            );
        }
    }
    be.set_key_split(before);
    let _ = writeln!(out);
    Ok(())
}
