//! The whole model on the GPU against the CPU: one training step's loss and
//! every gradient (DiT and GPT-2), 20 steps of `tiny` (loss curves), run-to-run
//! determinism, and draft → remask → refine sampling, KV-cached and not,
//! token-identical to the CPU in f32 mode.

mod common;

use common::{compare, gpu, with_gpu, Tol};
use did_backend_cpu::CpuBackend;
use did_backend_cuda::Precision;
use did_core::backend::prelude::*;
use did_core::backend::Backend;
use did_core::model::{
    causal_batch, diffusion_batch, Architecture, DiffusionDenoiser, ModelConfig, TrainBatch,
    Trainer, TrainerConfig, Transformer,
};
use did_core::refine::{generate, GenerateConfig, RemaskStrategy, StagePlan};
use did_core::rng::{Purpose, RngStream};
use did_core::schedule::TrainingSchedule;

const VOCAB: usize = 61;
const MASK: u32 = 60;

fn small(arch: Architecture, context: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: VOCAB,
        mask_id: MASK,
        layers: 2,
        hidden: 64,
        heads: 4,
        mlp_hidden: 160,
        context,
        ..ModelConfig::preset("tiny", arch).unwrap()
    }
}

/// Token sequences with structure (so the loss moves): `a, a+1, …` with noise.
fn data(batch: usize, len: usize, step: u32) -> Vec<u32> {
    let s = RngStream::new(5, Purpose::DataOrder, 0, step);
    let mut x = Vec::with_capacity(batch * len);
    for b in 0..batch {
        let a = s.u32(b as u32, 0);
        for i in 0..len {
            let noise = s.u32(b as u32, 1 + i as u32) % 7 == 0;
            x.push(if noise {
                s.u32(b as u32, 9999 + i as u32) % 59
            } else {
                (a + i as u32) % 59
            });
        }
    }
    x
}

fn batch_for(model: &Transformer, batch: usize, block: usize, step: u32) -> TrainBatch {
    let len = model.config().context;
    let x = data(batch, len, step);
    match model.config().architecture {
        Architecture::Dit => diffusion_batch(
            &x,
            batch,
            len,
            block,
            &TrainingSchedule::default(),
            MASK,
            3,
            step,
        )
        .unwrap(),
        Architecture::Gpt2 => causal_batch(&x, batch, len).unwrap(),
    }
}

fn new_trainer<B: Backend>(be: &B, model: &Transformer) -> Trainer<B>
where
    B::Error: std::fmt::Debug,
{
    let config = TrainerConfig {
        lr: 1e-3,
        warmup_steps: 5,
        ema_decay: Some(0.99),
        ..TrainerConfig::default()
    };
    Trainer::new(be, model, config, &model.table().initial_values(1), 7).unwrap()
}

/// The loss and every gradient of one step from random weights (the reference
/// initialisation zeroes the adaLN gates and the head, which would leave most
/// gradients exactly zero). Parameters after the step are not compared: AdamW's
/// first step moves each by ±lr whatever the gradient's size, so the round-off
/// sign of a near-zero gradient would decide it.
fn one_step<B: Backend>(be: &B, model: &Transformer, batches: &[TrainBatch]) -> (f64, Vec<f32>)
where
    B::Error: std::fmt::Debug,
{
    let config = TrainerConfig {
        grad_clip: None,
        ema_decay: None,
        ..TrainerConfig::default()
    };
    let params = model.table().random_values(1, 0.2);
    let mut t = Trainer::new(be, model, config, &params, 7).unwrap();
    let report = t.step(be, model, batches).unwrap();
    let grads = Trainer::download_all(be, &t.grads, model.table().total()).unwrap();
    (report.loss, grads)
}

fn check_step(arch: Architecture, precision: Precision, tol: Tol) {
    let model = Transformer::new(small(arch, 48)).unwrap();
    // Two micro-batches (accumulation) at different block sizes for the DiT.
    let batches = [
        batch_for(&model, 3, 4, 0),
        batch_for(&model, 3, if arch == Architecture::Dit { 48 } else { 4 }, 1),
    ];
    let batches = if arch == Architecture::Dit {
        &batches[..]
    } else {
        &batches[..1]
    };
    let (cpu_loss, cpu_grads) = one_step(&CpuBackend::new(), &model, batches);
    let (gpu_loss, gpu_grads) = with_gpu(precision, |g| one_step(g, &model, batches));
    let rel = (gpu_loss - cpu_loss).abs() / cpu_loss.abs();
    assert!(
        rel < f64::from(tol.rtol) * 10.0,
        "{arch:?} {precision:?}: loss cpu {cpu_loss} gpu {gpu_loss}"
    );
    let mut failures = Vec::new();
    for e in model.table().entries() {
        let r = e.offset..e.offset + e.len();
        if let Err(msg) = compare(
            &format!("grad {}", e.name),
            &cpu_grads[r.clone()],
            &gpu_grads[r],
            tol,
        ) {
            failures.push(msg);
        }
    }
    assert!(
        failures.is_empty(),
        "{arch:?} {precision:?}: loss cpu {cpu_loss} gpu {gpu_loss}\n{}",
        failures.join("\n")
    );
    eprintln!(
        "{arch:?} {precision:?}: loss cpu {cpu_loss} gpu {gpu_loss}; every gradient within {tol:?}"
    );
}

#[test]
fn one_step_loss_and_every_gradient_match_the_cpu_dit() {
    if !gpu("one_step_loss_and_every_gradient_match_the_cpu_dit") {
        return;
    }
    // Gradients are sums over the batch: f32 round-off differs by summation order.
    check_step(
        Architecture::Dit,
        Precision::F32,
        Tol {
            rtol: 1e-3,
            atol: 1e-4,
        },
    );
    check_step(
        Architecture::Dit,
        Precision::Bf16,
        Tol {
            rtol: 0.1,
            atol: 0.1,
        },
    );
}

#[test]
fn one_step_loss_and_every_gradient_match_the_cpu_gpt2() {
    if !gpu("one_step_loss_and_every_gradient_match_the_cpu_gpt2") {
        return;
    }
    check_step(
        Architecture::Gpt2,
        Precision::F32,
        Tol {
            rtol: 1e-3,
            atol: 1e-4,
        },
    );
    check_step(
        Architecture::Gpt2,
        Precision::Bf16,
        Tol {
            rtol: 0.1,
            atol: 0.1,
        },
    );
}

/// 20 mix-scale steps of the `tiny` network (4 × 256, 4 heads, L = 128 here).
fn curve<B: Backend>(be: &B, model: &Transformer, steps: u32) -> (Vec<f64>, Vec<f32>)
where
    B::Error: std::fmt::Debug,
{
    let mut t = new_trainer(be, model);
    let mut losses = Vec::new();
    for step in 0..steps {
        let block = if step % 4 == 3 { 128 } else { 4 };
        losses.push(
            t.step(be, model, &[batch_for(model, 4, block, step)])
                .unwrap()
                .loss,
        );
    }
    let params = Trainer::download_all(be, t.eval_params(), model.table().total()).unwrap();
    (losses, params)
}

fn tiny() -> Transformer {
    Transformer::new(ModelConfig {
        vocab_size: VOCAB,
        mask_id: MASK,
        context: 128,
        ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
    })
    .unwrap()
}

#[test]
fn twenty_tiny_steps_follow_the_cpu_loss_curve_and_repeat_bit_for_bit() {
    if !gpu("twenty_tiny_steps_follow_the_cpu_loss_curve_and_repeat_bit_for_bit") {
        return;
    }
    let model = tiny();
    let (cpu, _) = curve(&CpuBackend::new(), &model, 20);
    for (precision, band) in [(Precision::F32, 2e-3), (Precision::Bf16, 5e-2)] {
        let (gpu_a, _) = with_gpu(precision, |g| curve(g, &model, 20));
        let (gpu_b, _) = with_gpu(precision, |g| curve(g, &model, 20));
        assert_eq!(gpu_a, gpu_b, "{precision:?}: two runs with one seed differ");
        let worst = cpu
            .iter()
            .zip(&gpu_a)
            .map(|(c, g)| (g - c).abs() / c.abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{precision:?}: 20 steps, worst relative loss difference {worst:.2e} (band {band:.0e})"
        );
        eprintln!("  cpu {:?}\n  gpu {:?}", &cpu, &gpu_a);
        assert!(worst < band, "{precision:?}: loss curves differ by {worst:.2e} > {band:.0e}\ncpu {cpu:?}\ngpu {gpu_a:?}");
    }
}

/// Issue #6's band: 200 steps of `tiny` with bf16 storage follow the f32 curve on the same
/// batches. Single steps are noisy (a fresh noise draw each), so the band is on 20-step means:
/// each within 10 % of f32's (the calibration is in docs/perf/gpu.md, "Measurements behind the
/// code's choices"; the optimizer state is f32 since, decision 58); a bf16 run that stopped
/// learning would be off by more than 100 %. `DID_CUDA_ATTENTION=flash` runs it with the flash
/// kernels.
#[test]
fn two_hundred_tiny_steps_in_bf16_follow_the_f32_loss_curve() {
    if !gpu("two_hundred_tiny_steps_in_bf16_follow_the_f32_loss_curve") {
        return;
    }
    let model = tiny();
    let (f32_curve, _) = with_gpu(Precision::F32, |g| curve(g, &model, 200));
    let (bf16_curve, _) = with_gpu(Precision::Bf16, |g| curve(g, &model, 200));
    let means = |c: &[f64]| -> Vec<f64> {
        c.chunks(20)
            .map(|w| w.iter().sum::<f64>() / w.len() as f64)
            .collect()
    };
    let (a, b) = (means(&f32_curve), means(&bf16_curve));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (y - x).abs() / x.abs())
        .fold(0.0, f64::max);
    const BAND: f64 = 0.10;
    eprintln!("200 steps, 20-step means: f32 {a:.4?}\n  bf16 {b:.4?}\n  worst relative difference {worst:.2e} (band {BAND:.0e})");
    assert!(
        worst < BAND,
        "bf16 and f32 loss curves differ by {worst:.2e} > {BAND:.0e}\nf32 {a:?}\nbf16 {b:?}"
    );
}

/// A bf16 trainer keeps f32 masters (decision 58): its state downloads in f32, the model's
/// weights are those masters rounded to bf16, and a trainer resumed from the state (as from a
/// checkpoint) takes the next steps bit for bit as the one it was saved from.
#[test]
fn a_bf16_trainer_resumed_from_its_f32_state_continues_bit_for_bit() {
    if !gpu("a_bf16_trainer_resumed_from_its_f32_state_continues_bit_for_bit") {
        return;
    }
    let model = tiny();
    let n = model.table().total();
    with_gpu(Precision::Bf16, |be| {
        let mut t = new_trainer(be, &model);
        for step in 0..6 {
            t.step(be, &model, &[batch_for(&model, 4, 4, step)])
                .unwrap();
        }
        let state = t.state(be).unwrap();
        let rounded = Trainer::download_all(be, t.params(), n).unwrap();
        let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
        assert!(
            rounded
                .iter()
                .zip(&state.params)
                .all(|(&r, &m)| r == bf16(m)),
            "the model's bf16 weights are not the f32 masters rounded"
        );
        assert!(
            state.params.iter().any(|&m| bf16(m) != m),
            "the masters hold bf16 values only"
        );
        let mut resumed = Trainer::resume(be, &model, t.config, &state, t.seed).unwrap();
        for step in 6..9 {
            let b = batch_for(&model, 4, 4, step);
            let (x, y) = (
                t.step(be, &model, std::slice::from_ref(&b)).unwrap(),
                resumed.step(be, &model, &[b]).unwrap(),
            );
            assert_eq!(
                x.loss.to_bits(),
                y.loss.to_bits(),
                "step {step}: the resumed loss differs"
            );
        }
        assert!(
            t.state(be).unwrap() == resumed.state(be).unwrap(),
            "the resumed trainer's state differs"
        );
    });
}

fn sample<B: Backend>(
    be: &B,
    model: &Transformer,
    params: &[f32],
    plan: &str,
    remask: RemaskStrategy,
    cached: bool,
) -> Vec<Vec<u32>>
where
    B::Error: std::fmt::Debug + std::fmt::Display,
{
    let params = be.upload(params).unwrap();
    let mut denoiser = DiffusionDenoiser::new(be, model, &params, cached).unwrap();
    let plan: StagePlan = plan.parse().unwrap();
    let mut config = GenerateConfig::new(plan.resolve(model.config().context).unwrap(), 11);
    config.remask = remask;
    let prompts: [&[u32]; 2] = [&[MASK - 1, 3, 4], &[MASK - 1]];
    let g = generate(&mut denoiser, &config, &prompts)
        .map_err(|e| format!("{e:?}"))
        .unwrap();
    g.stages.iter().map(|s| s.tokens.clone()).collect()
}

#[test]
fn draft_remask_refine_is_token_identical_to_the_cpu_cached_or_not() {
    if !gpu("draft_remask_refine_is_token_identical_to_the_cpu_cached_or_not") {
        return;
    }
    let model = tiny();
    let (_, params) = curve(&CpuBackend::new(), &model, 12);
    let cpu_be = CpuBackend::new();
    for (plan, remask) in [
        ("4", RemaskStrategy::default()),
        ("4,L:0.25", RemaskStrategy::default()),
        ("4,16:0.5,L:0.25", RemaskStrategy::PostHoc),
        ("4,L:0.25", RemaskStrategy::Random),
        // The parallel rules (device draws; the entropy rule's host draws) and adaptive remasking.
        (
            "4@threshold:0.5,L:below:0.5:0..0.5@entropy:1",
            RemaskStrategy::default(),
        ),
        ("4@topk:2,L:0.25@threshold:0.9", RemaskStrategy::default()),
    ] {
        let cpu = sample(&cpu_be, &model, &params, plan, remask, true);
        for cached in [true, false] {
            let gpu_tokens = with_gpu(Precision::F32, |g| {
                sample(g, &model, &params, plan, remask, cached)
            });
            assert_eq!(
                cpu, gpu_tokens,
                "plan {plan}, {remask:?}, cached {cached}: every stage's tokens"
            );
        }
        // bf16 storage runs the same path end to end (tokens may differ).
        let bf16 = with_gpu(Precision::Bf16, |g| {
            sample(g, &model, &params, plan, remask, true)
        });
        assert!(bf16.iter().flatten().all(|&t| t != MASK));
        eprintln!(
            "plan {plan} {remask:?}: f32 GPU tokens identical to the CPU (cached and uncached)"
        );
    }
}

#[test]
fn recorded_draft_passes_replay_to_the_same_tokens() {
    if !gpu("recorded_draft_passes_replay_to_the_same_tokens") {
        return;
    }
    use did_backend_cuda::key_split::KeySplit;
    let model = tiny();
    let (_, params) = curve(&CpuBackend::new(), &model, 12);
    let context = model.config().context;
    // The whole context, and three contexts (the cache's window slides: new buffers, new
    // recordings); each with the key tiles as the policy splits them (whole at this context)
    // and split a tile a block, whose scratch is allocated and freed inside the recording as
    // at L = 1024 (graph memory nodes).
    for split in [KeySplit::Auto, KeySplit::TilesPerBlock(1)] {
        for (plan, len) in [("4,L:0.25", context), ("4", 3 * context)] {
            let run = |g: &did_backend_cuda::CudaBackend, graphs: bool| {
                g.set_graphs(graphs);
                g.set_key_split(split);
                let before = g.counts();
                let dev = g.upload(&params).unwrap();
                let mut denoiser = DiffusionDenoiser::new(g, &model, &dev, true).unwrap();
                let plan: StagePlan = plan.parse().unwrap();
                let config = GenerateConfig::new(plan.resolve(len).unwrap(), 11);
                let prompts: [&[u32]; 2] = [&[MASK - 1, 3, 4], &[MASK - 1]];
                let tokens = generate(&mut denoiser, &config, &prompts)
                    .map_err(|e| format!("{e:?}"))
                    .unwrap()
                    .batch
                    .tokens;
                let alive = g.recordings();
                drop(denoiser);
                let after = g.counts();
                let replays = after.graph_launches - before.graph_launches;
                let failed = after.failed_recordings - before.failed_recordings;
                g.set_graphs(false);
                g.set_key_split(KeySplit::Auto);
                (
                    tokens,
                    replays,
                    failed,
                    g.first_failed_recording(),
                    alive,
                    g.recordings(),
                )
            };
            let (plain, plain_replays, ..) = with_gpu(Precision::Bf16, |g| run(g, false));
            let (recorded, replays, failed, why, alive, left) =
                with_gpu(Precision::Bf16, |g| run(g, true));
            let (again, ..) = with_gpu(Precision::Bf16, |g| run(g, true));
            let case = format!("{plan} at {len}, keys {split:?}");
            assert_eq!(plain_replays, 0);
            assert_eq!(
                failed, 0,
                "{case}: {failed} passes not recorded; the first: {why:?}"
            );
            // Each draft call and commit over a block position replays its recording. (A refine
            // stage's larger scratch frees the draft's graphs: only a draft-only plan keeps them.)
            assert!(replays > 0, "{case}: no replays");
            assert!(
                plan != "4" || alive > 0,
                "{case}: no graph alive before the drop"
            );
            assert_eq!(left, 0, "{case}: the denoiser's graphs outlive it");
            assert_eq!(plain, recorded, "{case}: tokens with and without graphs");
            assert_eq!(recorded, again, "{case}: a second recorded run");
            eprintln!("{case}: {replays} replays of {alive} graphs, the same tokens");
        }
    }
}
