//! The transformer on the CPU backend: whole-model gradients against f64
//! finite differences, the vectorised BD3 pass against per-block passes, the
//! KV cache against uncached passes, joint calls of several denoisers against
//! each one's own call, and the memory report against what is allocated.

use did_backend_cpu::{CpuBackend, CpuBuffer};
use did_core::backend::prelude::*;
use did_core::denoiser::{DenoiseRequest, Denoiser, OutputPosition};
use did_core::model::CausalSampler;
use did_core::model::{
    causal_batch, diffusion_batch, memory_report, memory_report_on, Activations, Architecture,
    BackwardStage, DiffusionDenoiser, DropoutStreams, Inference, JointRequest, ModelConfig, Pass,
    StorageLayout, TrainBatch, Transformer,
};
use did_core::rng::{Purpose, RngStream};
use did_core::sample::categorical::{draw_token, DrawScratch};
use did_core::sample::{Confidence, DrawSpec, SampledToken};
use did_core::sample::{Nucleus, NucleusRule};
use did_core::schedule::TrainingSchedule;
use quickcheck::{QuickCheck, TestResult};

fn micro(arch: Architecture, vocab: usize, context: usize, dropout: f32) -> ModelConfig {
    ModelConfig {
        architecture: arch,
        vocab_size: vocab,
        mask_id: vocab as u32 - 1,
        layers: 2,
        hidden: 8,
        heads: 2,
        mlp_hidden: 12,
        context,
        cond_dim: 6,
        dropout,
        norm_eps: 1e-5,
        rope_base: 10_000.0,
    }
}

fn tokens(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let s = RngStream::new(seed, Purpose::DataOrder, 0, 0);
    (0..n).map(|i| s.u32(0, i as u32) % vocab).collect()
}

/// Every parameter tensor's gradient against central differences, all in f64, with the head
/// and the loss run in chunks of 5 output rows (the trainer's way; the last chunk is short)
/// and the logits' rows padded to a multiple of 8 (as the CUDA backend pads them); the f32
/// backend holding every row's logits densely must agree with it.
fn gradient_check(config: ModelConfig, batch: TrainBatch, dropout: Option<DropoutStreams>) {
    let be = CpuBackend::<f64>::with_float().with_row_alignment(8);
    assert_ne!(be.padded_row_stride(config.vocab_size), config.vocab_size);
    let model = Transformer::new(config).unwrap();
    let host = CpuBuffer::from(model.table().random_values(3, 0.4));
    let params: CpuBuffer<f64> = host
        .iter()
        .map(|&x| f64::from(x))
        .collect::<Vec<_>>()
        .into();
    assert_ne!((batch.batch * batch.seq_len) % 5, 0, "a short last chunk");
    let mut acts =
        Activations::with_loss_rows(&be, &config, batch.batch, batch.seq_len, batch.pass, 5)
            .unwrap();
    model.load_batch(&be, &mut acts, &batch).unwrap();
    model.forward(&be, &params, &mut acts, dropout).unwrap();
    let mut grads = CpuBuffer::from(vec![0.0f64; params.len()]);
    model
        .backward(&be, &params, &mut grads, &mut acts, dropout, 1.0)
        .unwrap();
    let mut loss_at = |p: &CpuBuffer<f64>| model.loss(&be, p, &mut acts, dropout).unwrap();
    // The f32 backend's gradients agree with these.
    let be32 = CpuBackend::<f32>::new();
    let mut acts32 =
        Activations::new(&be32, &config, batch.batch, batch.seq_len, batch.pass).unwrap();
    model.load_batch(&be32, &mut acts32, &batch).unwrap();
    model.forward(&be32, &host, &mut acts32, dropout).unwrap();
    let mut grads32 = CpuBuffer::from(vec![0.0f32; params.len()]);
    model
        .backward(&be32, &host, &mut grads32, &mut acts32, dropout, 1.0)
        .unwrap();
    for e in model.table().entries() {
        let range = e.offset..e.offset + e.len();
        let step = (e.len() / 12).max(1);
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for i in range.clone().step_by(step) {
            let h = 1e-5;
            let mut p = params.clone();
            p[i] += h;
            let lp = loss_at(&p);
            p[i] -= 2.0 * h;
            let lm = loss_at(&p);
            let fd = (lp - lm) / (2.0 * h);
            if std::env::var("GC_DEBUG").is_ok() && e.name.contains("emb") {
                eprintln!("{} {i}: fd {fd:e} an {:e}", e.name, grads[i]);
            }
            diff += (fd - grads[i]).powi(2);
            norm += fd.powi(2).max(grads[i].powi(2));
        }
        let rel = (diff / norm.max(1e-30)).sqrt();
        if std::env::var("GC_DEBUG").is_ok() {
            eprintln!("{:40} rel {rel:.2e} norm {norm:.2e}", e.name);
        }
        assert!(
            norm > 0.0,
            "{}: zero gradient at every sampled element",
            e.name
        );
        assert!(
            rel < 1e-3,
            "{} ({:?}): relative error {rel:e} against finite differences",
            e.name,
            batch.pass
        );
        let (mut d32, mut n32) = (0.0f64, 0.0f64);
        for i in range {
            d32 += (f64::from(grads32[i]) - grads[i]).powi(2);
            n32 += grads[i].powi(2);
        }
        assert!(
            (d32 / n32.max(1e-30)).sqrt() < 1e-3,
            "{}: f32 gradient differs from f64 by {:e}",
            e.name,
            (d32 / n32).sqrt()
        );
    }
}

/// Padding the logits' rows changes no value: loss and gradients of a chunked training step
/// equal bit for bit those over dense rows.
#[test]
fn padded_logits_rows_leave_loss_and_gradients_unchanged() {
    let config = micro(Architecture::Dit, 11, 8, 0.1);
    let x0 = tokens(4, 2 * 8, 10);
    let batch = diffusion_batch(&x0, 2, 8, 2, &TrainingSchedule::default(), 10, 5, 0).unwrap();
    let model = Transformer::new(config).unwrap();
    let params: CpuBuffer<f64> = model
        .table()
        .random_values(5, 0.4)
        .iter()
        .map(|&x| f64::from(x))
        .collect::<Vec<_>>()
        .into();
    let dropout = Some(DropoutStreams { seed: 3, step: 1 });
    let step = |be: &CpuBackend<f64>| {
        let mut acts =
            Activations::with_loss_rows(be, &config, batch.batch, batch.seq_len, batch.pass, 5)
                .unwrap();
        model.load_batch(be, &mut acts, &batch).unwrap();
        model.forward(be, &params, &mut acts, dropout).unwrap();
        let mut grads = CpuBuffer::from(vec![0.0f64; params.len()]);
        let loss = model
            .backward(be, &params, &mut grads, &mut acts, dropout, 1.0)
            .unwrap();
        (acts.logits_stride, loss, grads)
    };
    let (dense_stride, dense_loss, dense_grads) = step(&CpuBackend::with_float());
    let (padded_stride, padded_loss, padded_grads) =
        step(&CpuBackend::with_float().with_row_alignment(64));
    assert_eq!((dense_stride, padded_stride), (11, 64));
    assert_eq!(padded_loss.to_bits(), dense_loss.to_bits());
    assert!(padded_grads == dense_grads, "the gradients differ");
}

/// A chunked loss runs the head over the rows with a loss weight only (the masked positions):
/// the same loss and gradients, to f64 rounding, as the head over every output row.
#[test]
fn the_head_over_the_weighted_rows_equals_the_head_over_every_row() {
    let config = micro(Architecture::Dit, 11, 8, 0.1);
    let x0 = tokens(6, 3 * 8, 10);
    let batch = diffusion_batch(&x0, 3, 8, 2, &TrainingSchedule::default(), 10, 2, 0).unwrap();
    let rows = batch.batch * batch.seq_len;
    let weighted = batch.weights.iter().filter(|&&w| w != 0.0).count();
    assert!(
        0 < weighted && weighted < rows,
        "{weighted} of {rows} rows weighted"
    );
    let model = Transformer::new(config).unwrap();
    let params: CpuBuffer<f64> = model
        .table()
        .random_values(8, 0.4)
        .iter()
        .map(|&x| f64::from(x))
        .collect::<Vec<_>>()
        .into();
    let dropout = Some(DropoutStreams { seed: 5, step: 2 });
    let be = CpuBackend::<f64>::with_float();
    let step = |loss_rows: usize| {
        let mut acts = Activations::with_loss_rows(
            &be,
            &config,
            batch.batch,
            batch.seq_len,
            batch.pass,
            loss_rows,
        )
        .unwrap();
        model.load_batch(&be, &mut acts, &batch).unwrap();
        model.forward(&be, &params, &mut acts, dropout).unwrap();
        let mut grads = CpuBuffer::from(vec![0.0f64; params.len()]);
        let loss = model
            .backward(&be, &params, &mut grads, &mut acts, dropout, 1.0)
            .unwrap();
        let eval = model.loss(&be, &params, &mut acts, dropout).unwrap();
        (acts.loss_row_count, loss, eval, grads)
    };
    let (all_rows, loss, eval, grads) = step(usize::MAX);
    let (loss_rows, chunked_loss, chunked_eval, chunked_grads) = step(4);
    assert_eq!((all_rows, loss_rows), (rows, weighted));
    for (a, b) in [(loss, chunked_loss), (eval, chunked_eval), (loss, eval)] {
        assert!((a - b).abs() <= 1e-12 * a.abs(), "losses {a} and {b}");
    }
    let scale = grads.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let worst = grads
        .iter()
        .zip(chunked_grads.iter())
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-12 * scale,
        "gradients differ by {worst:e} (largest {scale:e})"
    );
}

#[test]
fn dit_bd3_gradients_match_finite_differences() {
    let config = micro(Architecture::Dit, 11, 8, 0.1);
    let x0 = tokens(1, 2 * 8, 10);
    let batch = diffusion_batch(&x0, 2, 8, 2, &TrainingSchedule::default(), 10, 5, 0).unwrap();
    gradient_check(config, batch, Some(DropoutStreams { seed: 9, step: 4 }));
}

#[test]
fn dit_full_attention_gradients_match_finite_differences() {
    let config = micro(Architecture::Dit, 11, 7, 0.0);
    let x0 = tokens(2, 7, 10);
    let batch = diffusion_batch(&x0, 1, 7, 7, &TrainingSchedule::default(), 10, 6, 1).unwrap();
    assert_eq!(batch.pass, Pass::Full);
    gradient_check(config, batch, None);
}

#[test]
fn gpt2_causal_gradients_match_finite_differences() {
    let config = micro(Architecture::Gpt2, 13, 9, 0.1);
    let x = tokens(3, 2 * 9, 13);
    gradient_check(
        config,
        causal_batch(&x, 2, 9).unwrap(),
        Some(DropoutStreams { seed: 1, step: 2 }),
    );
}

fn random_model(
    arch: Architecture,
    vocab: usize,
    context: usize,
    seed: u64,
) -> (Transformer, CpuBuffer<f32>) {
    let config = ModelConfig {
        hidden: 32,
        heads: 2,
        mlp_hidden: 48,
        layers: 2,
        cond_dim: 16,
        ..micro(arch, vocab, context, 0.1)
    };
    let model = Transformer::new(config).unwrap();
    let params = CpuBuffer::from(model.table().random_values(seed, 0.3));
    (model, params)
}

#[test]
fn vectorised_bd3_pass_equals_per_block_passes() {
    let be = CpuBackend::<f32>::new();
    let (l, block, batch, vocab) = (16, 4, 2, 50);
    let (model, params) = random_model(Architecture::Dit, vocab, l, 11);
    let x0 = tokens(4, batch * l, vocab as u32 - 1);
    let b = diffusion_batch(
        &x0,
        batch,
        l,
        block,
        &TrainingSchedule::default(),
        vocab as u32 - 1,
        3,
        0,
    )
    .unwrap();
    let mut acts = Activations::new(&be, model.config(), batch, l, b.pass).unwrap();
    model.load_batch(&be, &mut acts, &b).unwrap();
    model.forward(&be, &params, &mut acts, None).unwrap();
    let mut vectorised = vec![0.0f32; batch * l * vocab];
    be.download(
        did_core::backend::Slice::whole(&acts.logits),
        &mut vectorised,
    )
    .unwrap();
    let mut inference = Inference::new(&be, &model, &params).unwrap();
    let mut worst = 0.0f32;
    for s in 0..batch {
        let xt = &b.inputs[s * 2 * l..s * 2 * l + l];
        let clean = &x0[s * l..(s + 1) * l];
        for blk in 0..l / block {
            // The naive computation: the clean prefix, then this noisy block, block-causal.
            let mut seq = clean[..blk * block].to_vec();
            seq.extend_from_slice(&xt[blk * block..(blk + 1) * block]);
            let naive = inference.logits_uncached(&seq, 1, block).unwrap();
            for i in 0..block {
                let pos = blk * block + i;
                let a = &naive[pos * vocab..(pos + 1) * vocab];
                let v = &vectorised[(s * l + pos) * vocab..(s * l + pos + 1) * vocab];
                for (x, y) in a.iter().zip(v) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    assert!(
        worst < 1e-5,
        "vectorised and per-block logits differ by {worst}"
    );
}

#[test]
fn kv_cache_equals_uncached_passes_across_the_window() {
    fn prop(a: u8, b: u8, c: u8, seed: u64) -> TestResult {
        let be = CpuBackend::<f32>::new();
        let block = [1, 2, 3, 4, 6][a as usize % 5];
        let context = block * (1 + b as usize % 4) + (seed as usize % 3);
        let blocks = 1 + c as usize % 9;
        let l = block * blocks;
        let vocab = 20;
        let mask = vocab as u32 - 1;
        let (model, params) = random_model(Architecture::Dit, vocab, context.max(block), seed);
        let clean = tokens(seed, 2 * l, mask);
        let seed = seed as usize % 1000;
        let mut cached = DiffusionDenoiser::new(&be, &model, &params, true).unwrap();
        let mut uncached = Inference::new(&be, &model, &params).unwrap();
        cached.begin_stage(2, l, block).unwrap();
        let mut worst = 0.0f32;
        for blk in 0..blocks {
            let range = blk * block..(blk + 1) * block;
            // The block being generated is partly masked; later blocks are all masked.
            let mut seq = clean.clone();
            for s in 0..2 {
                for p in range.start..l {
                    if p >= range.end || (p + s + seed).is_multiple_of(3) {
                        seq[s * l + p] = mask;
                    }
                }
            }
            let outputs: Vec<OutputPosition> = (0..2)
                .flat_map(|s| {
                    range.clone().map(move |p| OutputPosition {
                        seq: s,
                        pos: p as u32,
                    })
                })
                .collect();
            let request = DenoiseRequest {
                tokens: &seq,
                batch: 2,
                seq_len: l,
                block_size: block,
                block: range.clone(),
                outputs: &outputs,
            };
            let mut got = vec![0.0f32; outputs.len() * vocab];
            cached.logits(&request, &mut got).unwrap();
            let prefix: Vec<u32> = (0..2)
                .flat_map(|s| seq[s * l..s * l + range.end].to_vec())
                .collect();
            let want = uncached.logits_uncached(&prefix, 2, block).unwrap();
            for (o, row) in outputs.iter().zip(got.chunks(vocab)) {
                let w = &want[(o.seq as usize * range.end + o.pos as usize) * vocab..][..vocab];
                for (x, y) in row.iter().zip(w) {
                    worst = worst.max((x - y).abs());
                }
            }
            // The block becomes final: commit its clean tokens.
            let request = DenoiseRequest {
                tokens: &clean,
                ..request
            };
            cached.commit_block(&request).unwrap();
        }
        if worst < 2e-5 {
            TestResult::passed()
        } else {
            TestResult::error(format!("block {block}, context {context}, length {l}: cached and uncached logits differ by {worst}"))
        }
    }
    QuickCheck::new()
        .tests(40)
        .quickcheck(prop as fn(u8, u8, u8, u64) -> TestResult);
}

#[test]
fn joint_commits_and_calls_give_each_denoiser_its_own_logits_and_draws() {
    fn prop(a: u8, b: u8, seed: u64) -> TestResult {
        let be = CpuBackend::<f32>::new();
        let block = [1, 2, 4][a as usize % 3];
        let blocks = 3 + b as usize % 4;
        let l = block * blocks;
        // Past the context the windows slide, differently per member.
        let context = if seed.is_multiple_of(2) { l } else { 2 * block };
        let vocab = 20;
        let mask = vocab as u32 - 1;
        let (model, params) = random_model(Architecture::Dit, vocab, context, seed);
        // Three requests at different blocks over their own caches: (batch, block index).
        let members = [(1, 0), (2, blocks - 1), (1, blocks / 2)];
        let mut alone = Vec::new();
        let mut joint = Vec::new();
        let mut cleans = Vec::new();
        let mut requests = Vec::new();
        for (m, &(batch, at)) in members.iter().enumerate() {
            let clean = tokens(seed.wrapping_add(m as u64), batch * l, mask);
            let range = at * block..(at + 1) * block;
            let mut seq = clean.clone();
            for s in 0..batch {
                for p in range.start..l {
                    if p >= range.end || (p + s) % 2 == 0 {
                        seq[s * l + p] = mask;
                    }
                }
            }
            let outputs: Vec<OutputPosition> = (0..batch as u32)
                .flat_map(|s| {
                    range.clone().map(move |p| OutputPosition {
                        seq: s,
                        pos: p as u32,
                    })
                })
                .collect();
            let mut d = DiffusionDenoiser::new(&be, &model, &params, true).unwrap();
            d.begin_stage(batch, l, block).unwrap();
            // Its committed blocks: the clean tokens before this one.
            for j in 0..at {
                let done = DenoiseRequest {
                    tokens: &clean,
                    batch,
                    seq_len: l,
                    block_size: block,
                    block: j * block..(j + 1) * block,
                    outputs: &[],
                };
                d.commit_block(&done).unwrap();
            }
            alone.push(d);
            let mut d = DiffusionDenoiser::new(&be, &model, &params, true).unwrap();
            d.begin_stage(batch, l, block).unwrap();
            joint.push(d);
            cleans.push((clean, batch, at));
            requests.push((seq, batch, range, outputs));
        }
        let mut runner = DiffusionDenoiser::new(&be, &model, &params, true).unwrap();
        // The joint side commits its blocks together: block j of every member still short of it.
        for j in 0..blocks {
            let mut committing: Vec<JointRequest<'_, '_, '_, _>> = joint
                .iter_mut()
                .zip(&cleans)
                .filter(|(_, (_, _, at))| j < *at)
                .map(|(denoiser, (clean, batch, _))| JointRequest {
                    denoiser,
                    request: DenoiseRequest {
                        tokens: clean,
                        batch: *batch,
                        seq_len: l,
                        block_size: block,
                        block: j * block..(j + 1) * block,
                        outputs: &[],
                    },
                })
                .collect();
            runner.commit_together(&mut committing).unwrap();
        }
        type Owned = (Vec<u32>, usize, std::ops::Range<usize>, Vec<OutputPosition>);
        fn view(r: &Owned, l: usize, block: usize) -> DenoiseRequest<'_> {
            DenoiseRequest {
                tokens: &r.0,
                batch: r.1,
                seq_len: l,
                block_size: block,
                block: r.2.clone(),
                outputs: &r.3,
            }
        }
        let mut want = Vec::new();
        for (d, r) in alone.iter_mut().zip(&requests) {
            let mut rows = vec![0.0f32; r.3.len() * vocab];
            d.logits(&view(r, l, block), &mut rows).unwrap();
            want.extend(rows);
        }
        let mut together: Vec<JointRequest<'_, '_, '_, _>> = joint
            .iter_mut()
            .zip(&requests)
            .map(|(denoiser, r)| JointRequest {
                denoiser,
                request: view(r, l, block),
            })
            .collect();
        let mut got = vec![0.0f32; want.len()];
        runner.logits_together(&mut together, &mut got).unwrap();
        if got != want {
            let worst = got
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            return TestResult::error(format!(
                "block {block}, {blocks} blocks, context {context}: joint logits differ by {worst}"
            ));
        }
        // Drawn where the logits are: the same tokens as each member's own draw.
        let nucleus = Nucleus::new(0.9, NucleusRule::Bd3).unwrap();
        let draws: Vec<DrawSpec> = requests
            .iter()
            .enumerate()
            .flat_map(|(m, r)| {
                r.3.iter().map(move |o| DrawSpec {
                    stream: RngStream::new(seed, Purpose::Categorical, m as u32 * 8 + o.seq, 0),
                    row: o.pos,
                })
            })
            .collect();
        let blank = SampledToken {
            id: mask,
            confidence: Confidence::PINNED,
        };
        let mut drawn = vec![blank; draws.len()];
        runner
            .draw_together(&mut together, mask, &nucleus, &draws, &mut drawn)
            .unwrap();
        let mut scratch = DrawScratch::default();
        for ((row, spec), token) in want.chunks(vocab).zip(&draws).zip(&drawn) {
            let own = draw_token(row, mask, &nucleus, &spec.stream, spec.row, &mut scratch);
            if own != *token {
                return TestResult::error(format!("joint draw {token:?}, own {own:?}"));
            }
        }
        TestResult::passed()
    }
    QuickCheck::new()
        .tests(30)
        .quickcheck(prop as fn(u8, u8, u64) -> TestResult);
}

#[test]
fn causal_sampling_draws_what_uncached_logits_draw() {
    // Cached one-token calls must draw, position by position, what a fresh
    // uncached pass over the prefix draws with the same stream.
    let be = CpuBackend::<f32>::new();
    let vocab = 23;
    let mask = vocab as u32 - 1;
    for (context, prompt_len, seed) in [(13, 1, 3u64), (13, 2, 4), (16, 3, 5)] {
        let (model, params) = random_model(Architecture::Gpt2, vocab, context, seed);
        let nucleus = Nucleus::new(0.9, NucleusRule::default()).unwrap();
        let prompts: Vec<Vec<u32>> = (0..2).map(|s| tokens(seed + s, prompt_len, mask)).collect();
        let prompt_refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let len = 13;
        let mut sampler = CausalSampler::new(&be, &model, &params).unwrap();
        let g = sampler
            .generate(&prompt_refs, len, &nucleus, seed, 7, None)
            .unwrap();
        assert_eq!(g.nfe as usize, len - prompt_len);
        let mut uncached = Inference::new(&be, &model, &params).unwrap();
        let mut scratch = DrawScratch::default();
        for (s, prompt) in prompts.iter().enumerate() {
            let seq = &g.tokens[s * len..(s + 1) * len];
            assert_eq!(&seq[..prompt_len], prompt.as_slice());
            for pos in prompt_len..len {
                let logits = uncached.logits_uncached(&seq[..pos], 1, 1).unwrap();
                let row = &logits[(pos - 1) * vocab..pos * vocab];
                let stream = RngStream::new(seed, Purpose::Categorical, 7 + s as u32, 0);
                let want = draw_token(row, mask, &nucleus, &stream, pos as u32, &mut scratch);
                assert_eq!(
                    seq[pos], want.id,
                    "context {context}, sequence {s}, position {pos}"
                );
            }
        }
    }
    // Past the learned positions, and from a diffusion model: refused.
    let (model, params) = random_model(Architecture::Gpt2, vocab, 8, 1);
    let mut sampler = CausalSampler::new(&be, &model, &params).unwrap();
    let nucleus = Nucleus::default();
    assert!(sampler.generate(&[&[0]], 9, &nucleus, 1, 0, None).is_err());
    let (dit, params) = random_model(Architecture::Dit, vocab, 8, 1);
    assert!(CausalSampler::new(&be, &dit, &params).is_err());
}

#[test]
fn memory_report_counts_what_is_allocated() {
    // Dense logits rows, and rows padded to 8 as a GPU backend pads them.
    for (arch, pass, align) in [
        (Architecture::Dit, Pass::Bd3 { block_size: 2 }, 1),
        (Architecture::Dit, Pass::Full, 1),
        (Architecture::Gpt2, Pass::Causal, 1),
        (Architecture::Dit, Pass::Bd3 { block_size: 2 }, 8),
        (Architecture::Gpt2, Pass::Causal, 8),
    ] {
        let config = micro(arch, 11, 8, 0.1);
        let be = CpuBackend::<f32>::new().with_row_alignment(align);
        let acts = Activations::new(&be, &config, 3, 8, pass).unwrap();
        let stride = be.padded_row_stride(config.vocab_size);
        assert_eq!(stride, if align == 1 { 11 } else { 16 });
        let layout = StorageLayout {
            logits_stride: stride,
            element_bytes: 4,
        };
        let report = memory_report_on(&config, 3, 8, pass, layout);
        if align == 1 {
            assert_eq!(report, memory_report(&config, 3, 8, pass));
        }
        let mut saved: usize = acts.residual.iter().map(|r| r.len()).sum();
        for b in &acts.blocks {
            saved += [
                &b.ln1, &b.mean1, &b.rstd1, &b.h1, &b.qkv, &b.att, &b.lse, &b.y1, &b.x_mid, &b.ln2,
                &b.mean2, &b.rstd2, &b.h2, &b.f1, &b.g, &b.y2,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>();
        }
        if let Some(c) = &acts.cond {
            saved += [
                &c.time_embedding,
                &c.s1,
                &c.s1a,
                &c.s2,
                &c.c,
                &c.mods,
                &c.final_mod,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>();
        }
        saved += [
            &acts.hx,
            &acts.lnf,
            &acts.mean_f,
            &acts.rstd_f,
            &acts.hf,
            &acts.logits,
            &acts.weights,
            &acts.losses,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>();
        assert_eq!(report.activations, 4 * saved, "{arch:?} {pass:?}");
        let g = &acts.grad;
        let scratch: usize = [
            &g.dres, &g.dy, &g.dh, &g.dln, &g.dg, &g.df1, &g.datt, &g.dqkv, &g.dhf, &g.dlnf,
            &g.dhx, &g.dmods, &g.dc, &g.ds2, &g.ds1a, &g.ds1,
        ]
        .iter()
        .map(|v| v.len())
        .sum();
        assert_eq!(report.gradient_scratch, 4 * scratch, "{arch:?} {pass:?}");
    }
}

/// A backend that cannot record what it was asked to (a failed CUDA capture) must cost
/// nothing but speed: the passes it was asked to record run again, the tokens are the plain
/// backend's, and the sampler stops asking.
#[test]
fn a_failed_recording_leaves_the_samples_as_they_were() {
    use did_core::refine::{generate, GenerateConfig, StagePlan};
    let (model, params) = random_model(Architecture::Dit, 13, 16, 5);
    // Draft and refine over the context, and a draft over three (the cache's window slides).
    for (plan, len) in [("4,L:0.25", 16), ("4", 48)] {
        let sample = |be: &CpuBackend| {
            let dev = be.upload(&params).unwrap();
            let mut denoiser = DiffusionDenoiser::new(be, &model, &dev, true).unwrap();
            let plan: StagePlan = plan.parse().unwrap();
            let config = GenerateConfig::new(plan.resolve(len).unwrap(), 3);
            let prompts: [&[u32]; 2] = [&[1, 2], &[3]];
            generate(&mut denoiser, &config, &prompts).unwrap()
        };
        static REPORTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let reports = || REPORTS.load(std::sync::atomic::Ordering::Relaxed);
        let plain = sample(&CpuBackend::new().counting_failed_recordings(&REPORTS));
        assert_eq!(
            reports(),
            0,
            "{plan} at {len}: a backend that cannot record was told it failed"
        );
        let failing = sample(
            &CpuBackend::new()
                .with_failed_recordings()
                .counting_failed_recordings(&REPORTS),
        );
        assert_eq!(plain, failing, "{plan} at {len}");
        // The sampler says why it stopped recording (a GPU backend reports it), once a
        // denoiser's inference: it records no more after the first failure.
        assert!(
            reports() >= 1,
            "{plan} at {len}: the failure went unreported"
        );
        REPORTS.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Every range the backward reports final at a stage ([`BackwardStage`]) holds, at that moment,
/// the bits it ends with: what a data-parallel trainer sums while the backward goes on is
/// the finished gradient. Gradients start non-zero, as on a later micro-batch.
#[test]
fn each_gradient_bucket_is_final_when_its_stage_is_reported() {
    let dit = micro(Architecture::Dit, 11, 8, 0.1);
    let x0 = tokens(6, 2 * 8, 10);
    let bd3 = diffusion_batch(&x0, 2, 8, 2, &TrainingSchedule::default(), 10, 5, 0).unwrap();
    let gpt2 = micro(Architecture::Gpt2, 13, 9, 0.1);
    let causal = causal_batch(&tokens(7, 2 * 9, 13), 2, 9).unwrap();
    for (config, batch) in [(dit, bd3), (gpt2, causal)] {
        let be = CpuBackend::<f32>::new();
        let model = Transformer::new(config).unwrap();
        let params = CpuBuffer::from(model.table().random_values(8, 0.4));
        let mut acts =
            Activations::new(&be, &config, batch.batch, batch.seq_len, batch.pass).unwrap();
        model.load_batch(&be, &mut acts, &batch).unwrap();
        let dropout = Some(DropoutStreams { seed: 2, step: 3 });
        model.forward(&be, &params, &mut acts, dropout).unwrap();
        let mut grads = CpuBuffer::from(model.table().random_values(9, 0.1));
        let mut reported = Vec::new();
        model
            .backward_staged(
                &be,
                &params,
                &mut grads,
                &mut acts,
                dropout,
                0.5,
                |g, stage| {
                    for r in model.gradient_buckets().at(stage) {
                        reported.push((stage, r.clone(), g[r.clone()].to_vec()));
                    }
                    Ok(())
                },
            )
            .unwrap();
        let stages: Vec<BackwardStage> = model.gradient_buckets().stages().map(|s| s.0).collect();
        let mut order: Vec<BackwardStage> = reported.iter().map(|r| r.0).collect();
        order.dedup();
        assert_eq!(
            order, stages,
            "{:?}: stages in backward order",
            config.architecture
        );
        for (stage, range, then) in reported {
            let changed = then
                .iter()
                .zip(&grads[range.clone()])
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                changed, 0,
                "{:?}: {changed} gradients of {range:?} changed after {stage:?}",
                config.architecture
            );
        }
    }
}
