//! Criterion benches of the CPU backend's ops, one `tiny` training step,
//! one draft → refine sample, and the demo model's fixed and adaptive plans.
//!
//! Run: `cargo bench -p did-benches --bench cpu_ops` (add `-- --quick` for a
//! short pass). Figures and the machine are kept in docs/perf/README.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use did_backend_cpu::CpuBackend;
use did_core::backend::prelude::*;
use did_core::backend::{
    AdamW, AttentionShape, Gemm, NormShape, QkvOffsets, RowMajor, Slice, SliceMut,
};
use did_core::mask::AttentionMask;
use did_core::model::{
    diffusion_batch, Architecture, DiffusionDenoiser, ModelConfig, Trainer, TrainerConfig,
    Transformer,
};
use did_core::refine::{generate, GenerateConfig, StagePlan};
use did_core::rng::{Purpose, RngStream};
use did_core::schedule::TrainingSchedule;
use std::hint::black_box;

fn rand(seed: u64, n: usize) -> Vec<f32> {
    let s = RngStream::new(seed, Purpose::Init, 3, 0);
    (0..n)
        .map(|i| (2.0 * s.uniform((i >> 30) as u32, i as u32) - 1.0) as f32)
        .collect()
}

fn ops(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut g = c.benchmark_group("cpu_ops");
    g.sample_size(20);

    // The qkv projection of `small`: [2048, 768] · [2304, 768]ᵀ.
    let gemm = Gemm::linear(2048, 768, 2304);
    let (x, w) = (
        be.upload(&rand(1, 2048 * 768)).unwrap(),
        be.upload(&rand(2, 2304 * 768)).unwrap(),
    );
    let mut y = be.zeros(2048 * 2304).unwrap();
    g.throughput(Throughput::Elements(gemm.flops() as u64));
    g.bench_function("gemm_2048x768x2304 (elements = flops)", |b| {
        b.iter(|| {
            be.matmul(
                &gemm,
                Slice::whole(&x),
                Slice::whole(&w),
                SliceMut::whole(&mut y),
            )
            .unwrap()
        })
    });

    // LayerNorm over 8192 rows of 768, forward and backward.
    let s = NormShape {
        rows: 8192,
        cols: 768,
        eps: 1e-5,
    };
    let (x, wt, d) = (
        be.upload(&rand(3, 8192 * 768)).unwrap(),
        be.upload(&rand(4, 768)).unwrap(),
        be.upload(&rand(5, 8192 * 768)).unwrap(),
    );
    let (mut out, mut mean, mut rstd) = (
        be.zeros(8192 * 768).unwrap(),
        be.zeros(8192).unwrap(),
        be.zeros(8192).unwrap(),
    );
    let (mut dx, mut dw) = (be.zeros(8192 * 768).unwrap(), be.zeros(768).unwrap());
    g.throughput(Throughput::Elements((8192 * 768) as u64));
    g.bench_function("layernorm_fwd_bwd_8192x768", |b| {
        b.iter(|| {
            be.layernorm_forward(
                &s,
                Slice::whole(&x),
                Slice::whole(&wt),
                None,
                SliceMut::whole(&mut out),
                SliceMut::whole(&mut mean),
                SliceMut::whole(&mut rstd),
            )
            .unwrap();
            be.layernorm_backward(
                &s,
                Slice::whole(&d),
                Slice::whole(&x),
                Slice::whole(&wt),
                Slice::whole(&mean),
                Slice::whole(&rstd),
                SliceMut::whole(&mut dx),
                SliceMut::whole(&mut dw),
            )
            .unwrap();
        })
    });

    // BD3 training attention of `tiny` (L = 256, block 4: 2L = 512 queries), 4 heads of 64, batch 2.
    let (batch, heads, hd, l) = (2usize, 4usize, 64usize, 256usize);
    let width = heads * hd;
    let n = 2 * l;
    let shape = AttentionShape::fused_qkv(batch, heads, hd, n);
    let mask = AttentionMask::bd3_training(l, 4).unwrap();
    let qkv = be.upload(&rand(6, batch * n * 3 * width)).unwrap();
    let dout = be.upload(&rand(7, batch * n * width)).unwrap();
    let (mut o, mut lse) = (
        be.zeros(batch * n * width).unwrap(),
        be.zeros_f32(batch * heads * n).unwrap(),
    );
    let mut dqkv = be.zeros(batch * n * 3 * width).unwrap();
    g.throughput(Throughput::Elements((batch * n) as u64));
    g.bench_function(
        "attention_bd3_L256_block4_fwd_bwd (elements = queries)",
        |b| {
            b.iter(|| {
                let (q, k, v) = (
                    Slice::at(&qkv, 0),
                    Slice::at(&qkv, width),
                    Slice::at(&qkv, 2 * width),
                );
                be.attention_forward(
                    &shape,
                    &mask,
                    q,
                    k,
                    v,
                    SliceMut::whole(&mut o),
                    SliceMut::whole(&mut lse),
                )
                .unwrap();
                be.attention_backward(
                    &shape,
                    &mask,
                    Slice::whole(&dout),
                    q,
                    k,
                    v,
                    Slice::whole(&o),
                    Slice::whole(&lse),
                    SliceMut::whole(&mut dqkv),
                    QkvOffsets::fused(width),
                )
                .unwrap();
            })
        },
    );

    // Softmax cross-entropy over GPT-2's vocabulary, 256 rows.
    let (rows, vocab) = (256usize, 50_258usize);
    let logits0 = rand(8, rows * vocab);
    let mut logits = be.upload(&logits0).unwrap();
    let targets = be
        .upload_ids(
            &(0..rows as u32)
                .map(|i| i * 97 % 50_000)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let weights = be.upload(&vec![1.0 / rows as f32; rows]).unwrap();
    let mut losses = be.zeros(rows).unwrap();
    g.throughput(Throughput::Elements((rows * vocab) as u64));
    g.bench_function("softmax_cross_entropy_256x50258", |b| {
        b.iter(|| {
            be.softmax_cross_entropy(
                SliceMut::whole(&mut logits),
                &targets,
                Slice::whole(&weights),
                SliceMut::whole(&mut losses),
                RowMajor::dense(rows, vocab),
                Some(50_257),
                1.0,
            )
            .unwrap();
        })
    });

    // AdamW over `tiny`'s 4.2 M parameters.
    let np = 4_193_538usize;
    let (mut p, gr) = (
        be.upload(&rand(9, np)).unwrap(),
        be.upload(&rand(10, np)).unwrap(),
    );
    let (mut m, mut v) = (be.zeros(np).unwrap(), be.zeros(np).unwrap());
    g.throughput(Throughput::Elements(np as u64));
    g.bench_function("adamw_4.2M", |b| {
        b.iter(|| {
            be.adamw(
                &AdamW::default(),
                SliceMut::whole(&mut p),
                Slice::whole(&gr),
                SliceMut::whole(&mut m),
                SliceMut::whole(&mut v),
                np,
            )
            .unwrap()
        })
    });
    g.finish();
}

/// The demo's byte-level `tiny` DiT (4 × 256, context 128).
fn tiny() -> Transformer {
    Transformer::new(ModelConfig {
        vocab_size: 258,
        mask_id: 257,
        context: 128,
        ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
    })
    .unwrap()
}

fn model(c: &mut Criterion) {
    let be = CpuBackend::new();
    let model = tiny();
    let mut g = c.benchmark_group("tiny_bytes_L128");
    g.sample_size(10);
    let mut t = Trainer::new(
        &be,
        &model,
        TrainerConfig::default(),
        &model.table().random_values(1, 0.05),
        1,
    )
    .unwrap();
    let x: Vec<u32> = (0..8 * 128).map(|i| (i * 31 % 256) as u32).collect();
    let mut step = 0u32;
    g.throughput(Throughput::Elements(8 * 128));
    g.bench_function("train_step_bd3_block4_batch8 (elements = tokens)", |b| {
        b.iter(|| {
            step += 1;
            let batch =
                diffusion_batch(&x, 8, 128, 4, &TrainingSchedule::default(), 257, 1, step).unwrap();
            black_box(t.step(&be, &model, &[batch]).unwrap());
        })
    });
    let params = be.upload(&model.table().random_values(2, 0.05)).unwrap();
    let plan: StagePlan = "4,L:0.25".parse().unwrap();
    let gen = GenerateConfig::new(plan.resolve(128).unwrap(), 3);
    let prompt = [256u32];
    g.throughput(Throughput::Elements(1));
    g.bench_function("sample_draft_4_refine_L_0.25_one_sequence", |b| {
        b.iter(|| {
            let mut d = DiffusionDenoiser::new(&be, &model, &params, true).unwrap();
            black_box(generate(&mut d, &gen, &[&prompt]).unwrap());
        })
    });
    g.finish();
}

/// One sample of the committed demo model (real confidences, so the adaptive rules reveal
/// what they would in use) with the paper's fixed plan and with adaptive plans.
fn demo_plans(c: &mut Criterion) {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo/dit.safetensors.gz");
    let ckpt = did_engine::checkpoint::load(&path).unwrap();
    let be = CpuBackend::new();
    let model = Transformer::new(ckpt.config).unwrap();
    let params = be
        .upload(ckpt.ema.as_ref().unwrap_or(&ckpt.params))
        .unwrap();
    let mut g = c.benchmark_group("demo_model_L128");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    for (name, plan) in [
        ("fixed_4_L_0.25", "4,L:0.25"),
        ("adaptive_entropy_0.5_draft", "4@entropy:0.5"),
        (
            "adaptive_entropy_both_below_0.2",
            "4@entropy:0.5,L:below:0.2:0..0.25@entropy:1",
        ),
    ] {
        let gen = GenerateConfig::new(plan.parse::<StagePlan>().unwrap().resolve(128).unwrap(), 3);
        g.bench_function(format!("sample_{name}_one_sequence"), |b| {
            b.iter(|| {
                let mut d = DiffusionDenoiser::new(&be, &model, &params, true).unwrap();
                black_box(generate(&mut d, &gen, &[&[256u32]]).unwrap());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ops, model, demo_plans);
criterion_main!(benches);
