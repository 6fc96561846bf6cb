//! Training and sampling with the real network on a synthetic task whose
//! optimum is known: counting sequences `BOS, a, a+1, … (mod K)` with `a`
//! uniform. One visible token determines the whole sequence, so the best
//! possible loss is exactly computable for every batch.

use did_backend_cpu::CpuBackend;
use did_core::model::{
    causal_batch, diffusion_batch, Architecture, DiffusionDenoiser, ModelConfig, TrainBatch,
    Trainer, TrainerConfig, Transformer,
};
use did_core::refine::{generate, select_lowest, GenerateConfig, StagePlan};
use did_core::rng::{Purpose, RngStream};
use did_core::schedule::TrainingSchedule;

const K: u32 = 16;
const BOS: u32 = 16;
const MASK: u32 = 17;
const L: usize = 32;

/// The `tiny` preset's network (4 × 256, 4 heads) over the task's vocabulary.
fn tiny(arch: Architecture) -> ModelConfig {
    ModelConfig {
        vocab_size: 18,
        mask_id: MASK,
        context: L,
        ..ModelConfig::preset("tiny", arch).unwrap()
    }
}

fn counting(batch: usize, step: u32) -> Vec<u32> {
    let s = RngStream::new(42, Purpose::DataOrder, 0, step);
    let mut x = Vec::with_capacity(batch * L);
    for b in 0..batch {
        let a = s.u32(b as u32, 0) % K;
        x.push(BOS);
        x.extend((0..L as u32 - 1).map(|i| (a + i) % K));
    }
    x
}

/// The loss of the best possible model on a diffusion batch: a masked token
/// costs `ln K` (times its weight) unless a token of its sequence is visible to it.
fn diffusion_floor(b: &TrainBatch, block: usize) -> f64 {
    let mut floor = 0.0;
    for s in 0..b.batch {
        let xt = &b.inputs[s * 2 * L..s * 2 * L + L];
        for p in 0..L {
            if xt[p] != MASK {
                continue;
            }
            let blk = p / block;
            let own = (blk * block..(blk + 1) * block).any(|q| q > 0 && xt[q] != MASK);
            let clean_before = blk * block > 1;
            if !own && !clean_before {
                floor += f64::from(b.weights[s * L + p]) * f64::from(K).ln();
            }
        }
    }
    floor
}

fn trainer(be: &CpuBackend, model: &Transformer, lr: f32) -> Trainer<CpuBackend> {
    let config = TrainerConfig {
        lr,
        warmup_steps: 10,
        ema_decay: Some(0.99),
        ..TrainerConfig::default()
    };
    Trainer::new(be, model, config, &model.table().initial_values(1), 7).unwrap()
}

#[test]
fn bd3_training_reaches_the_nelbo_floor_and_samples_the_task() {
    let be = CpuBackend::new();
    let model = Transformer::new(tiny(Architecture::Dit)).unwrap();
    let mut t = trainer(&be, &model, 1e-3);
    let (batch, block, steps) = (8, 4, 200);
    let schedule = TrainingSchedule::default();
    let mut first = 0.0;
    let (mut gap, mut floor_sum, mut n) = (0.0, 0.0, 0);
    for step in 0..steps {
        let b = diffusion_batch(
            &counting(batch, step),
            batch,
            L,
            block,
            &schedule,
            MASK,
            7,
            step,
        )
        .unwrap();
        let floor = diffusion_floor(&b, block);
        let r = t.step(&be, &model, std::slice::from_ref(&b)).unwrap();
        assert!(
            r.loss.is_finite() && r.loss >= floor - 1e-6,
            "step {step}: loss {} below the floor {floor}",
            r.loss
        );
        if step == 0 {
            first = r.loss;
        }
        if step >= steps - 40 {
            gap += r.loss - floor;
            floor_sum += floor;
            n += 1;
        }
    }
    let (gap, floor) = (gap / f64::from(n), floor_sum / f64::from(n));
    eprintln!("BD3: first loss {first:.3}, floor {floor:.3}, final gap {gap:.3}");
    assert!(
        gap < 0.05 * first,
        "NELBO {:.3} did not approach its floor {floor:.3} (started at {first:.3})",
        floor + gap
    );

    // Draft (block 4, KV cache) → snapshot remask 25% → global refine, with the EMA weights.
    let plan: StagePlan = "4,L:0.25".parse().unwrap();
    let config = GenerateConfig::new(plan.resolve(L).unwrap(), 5);
    let prompts: Vec<&[u32]> = vec![&[BOS]; 4];
    let mut denoiser = DiffusionDenoiser::new(&be, &model, t.eval_params(), true).unwrap();
    let g = generate(&mut denoiser, &config, &prompts).unwrap();
    let (draft, refined) = (&g.stages[0].tokens, &g.stages[1].tokens);
    let mut counting_pairs = 0;
    for s in 0..4 {
        let (d, r) = (&draft[s * L..(s + 1) * L], &refined[s * L..(s + 1) * L]);
        assert_eq!((d[0], r[0]), (BOS, BOS), "the prompt is kept");
        assert!(
            d.iter().chain(r).all(|&x| x != MASK),
            "no [MASK] survives a stage"
        );
        let remasked = &g.stages[1].remasked[s];
        assert_eq!(
            remasked.len(),
            (0.25 * (L - 1) as f64).floor() as usize,
            "floor(γ·n) positions remasked"
        );
        for p in 0..L {
            if !remasked.contains(&p) {
                assert_eq!(d[p], r[p], "position {p} was not remasked but changed");
            }
        }
        counting_pairs += r[1..].windows(2).filter(|w| (w[0] + 1) % K == w[1]).count();
    }
    let frac = counting_pairs as f64 / (4 * (L - 2)) as f64;
    eprintln!("samples that continue the count: {:.1}%", 100.0 * frac);
    assert!(
        frac > 0.6,
        "the trained model's samples follow the task in only {:.0}% of places",
        100.0 * frac
    );
    // The remasked positions are the lowest snapshot confidences of the draft:
    // a draft-only run with the same seed reproduces the draft and its confidences.
    let draft_only = GenerateConfig::new("4".parse::<StagePlan>().unwrap().resolve(L).unwrap(), 5);
    let mut denoiser = DiffusionDenoiser::new(&be, &model, t.eval_params(), true).unwrap();
    let d = generate(&mut denoiser, &draft_only, &prompts).unwrap();
    assert_eq!(&d.batch.tokens, draft, "the draft stage is reproducible");
    for s in 0..4 {
        let scores: Vec<f64> = (0..L)
            .map(|p| d.batch.confidence[s * L + p].nucleus)
            .collect();
        let eligible: Vec<bool> = (0..L).map(|p| d.batch.eligible(s, p)).collect();
        assert_eq!(
            select_lowest(&scores, &eligible, 0.25, None),
            g.stages[1].remasked[s],
            "sequence {s}"
        );
    }
    // The same generation without the KV cache draws the same tokens.
    let mut uncached = DiffusionDenoiser::new(&be, &model, t.eval_params(), false).unwrap();
    let g2 = generate(&mut uncached, &config, &prompts).unwrap();
    let same = g
        .batch
        .tokens
        .iter()
        .zip(&g2.batch.tokens)
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        same as f64 >= 0.97 * g.batch.tokens.len() as f64,
        "cached and uncached sampling disagree at {} of {} tokens",
        g.batch.tokens.len() - same,
        g.batch.tokens.len()
    );

    // Parallel rules on this confident model: far fewer calls, the task still followed, the
    // cache still exact, and the adaptive remask within its bounds.
    let plan = "4@threshold:0.9,L:below:0.5:0..0.25@entropy:0.5";
    let fast = GenerateConfig::new(plan.parse::<StagePlan>().unwrap().resolve(L).unwrap(), 5);
    let mut denoiser = DiffusionDenoiser::new(&be, &model, t.eval_params(), true).unwrap();
    let a = generate(&mut denoiser, &fast, &prompts).unwrap();
    let mut uncached = DiffusionDenoiser::new(&be, &model, t.eval_params(), false).unwrap();
    let b = generate(&mut uncached, &fast, &prompts).unwrap();
    let same = a
        .batch
        .tokens
        .iter()
        .zip(&b.batch.tokens)
        .filter(|(x, y)| x == y)
        .count();
    assert!(
        same as f64 >= 0.97 * a.batch.tokens.len() as f64,
        "{plan}: cached and uncached differ"
    );
    assert!(a.batch.tokens.iter().all(|&x| x != MASK));
    let pairs: usize = (0..4)
        .map(|s| {
            a.batch.tokens[s * L + 1..(s + 1) * L]
                .windows(2)
                .filter(|w| (w[0] + 1) % K == w[1])
                .count()
        })
        .sum();
    let parallel_frac = pairs as f64 / (4 * (L - 2)) as f64;
    eprintln!(
        "{plan}: draft NFE {} (first-hitting {}), total {}; {:.1}% continue the count",
        a.stages[0].nfe,
        g.stages[0].nfe,
        a.nfe(),
        100.0 * parallel_frac
    );
    assert!(
        2 * a.stages[0].nfe <= g.stages[0].nfe,
        "the threshold draft saved too few calls"
    );
    assert!(
        parallel_frac > 0.6,
        "{plan}: the count is followed in only {:.0}%",
        100.0 * parallel_frac
    );
    assert!(a.stages[1].remasked.iter().all(|r| r.len() <= (L - 1) / 4));
}

#[test]
fn ar_training_reaches_the_cross_entropy_floor() {
    let be = CpuBackend::new();
    let model = Transformer::new(tiny(Architecture::Gpt2)).unwrap();
    let mut t = trainer(&be, &model, 1e-3);
    let floor = f64::from(K).ln() / (L - 1) as f64; // only the first token after BOS is uncertain
    let (mut last, mut first) = (0.0, 0.0);
    let steps = 120;
    for step in 0..steps {
        let b = causal_batch(&counting(8, step), 8, L).unwrap();
        let r = t.step(&be, &model, &[b]).unwrap();
        if step == 0 {
            first = r.loss;
        }
        if step >= steps - 20 {
            last += r.loss / 20.0;
        }
    }
    eprintln!("AR: first loss {first:.3}, floor {floor:.3}, final {last:.3}");
    assert!(
        last - floor < 0.05 * first,
        "AR loss {last:.3} did not approach its floor {floor:.3} (started at {first:.3})"
    );
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let run = || {
        let be = CpuBackend::new();
        let model = Transformer::new(tiny(Architecture::Dit)).unwrap();
        let mut t = trainer(&be, &model, 1e-3);
        let losses: Vec<u64> = (0..3)
            .map(|step| {
                let b = diffusion_batch(
                    &counting(4, step),
                    4,
                    L,
                    4,
                    &TrainingSchedule::default(),
                    MASK,
                    7,
                    step,
                )
                .unwrap();
                t.step(&be, &model, &[b]).unwrap().loss.to_bits()
            })
            .collect();
        (losses, t.params().clone())
    };
    let (a, pa) = run();
    let (b, pb) = run();
    assert_eq!(a, b);
    assert!(
        pa.iter()
            .zip(pb.iter())
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "parameters differ"
    );
}

/// With weights the model reads in bf16, as on a bf16 GPU (`CpuBackend::with_bf16_weights`), the
/// trainer keeps f32 masters of the weights, moments and EMA: after every step the model's copies
/// are exactly the masters rounded, the masters keep updates their copies cannot show yet (a
/// LayerNorm weight of 1 moved by less than half a bf16 step), a checkpoint holds the masters,
/// and a trainer resumed from it continues bit for bit.
#[test]
fn bf16_weights_keep_f32_masters_and_round_the_copies_the_model_reads() {
    let be = CpuBackend::new().with_bf16_weights();
    let model = Transformer::new(tiny(Architecture::Dit)).unwrap();
    let batch = |step: u32| {
        diffusion_batch(
            &counting(4, step),
            4,
            L,
            4,
            &TrainingSchedule::default(),
            MASK,
            7,
            step,
        )
        .unwrap()
    };
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let initial = model.table().initial_values(1);
    let mut t = trainer(&be, &model, 3e-4);
    for step in 0..3 {
        t.step(&be, &model, &[batch(step)]).unwrap();
        let state = t.state(&be).unwrap();
        let ema = state.ema.as_ref().unwrap();
        assert!(
            t.params()
                .iter()
                .zip(&state.params)
                .all(|(&r, &m)| r == bf16(m)),
            "step {step}: the model's weights are not the masters rounded"
        );
        assert!(
            t.eval_params().iter().zip(ema).all(|(&r, &m)| r == bf16(m)),
            "step {step}: the model's EMA is not the EMA master rounded"
        );
    }
    let state = t.state(&be).unwrap();
    assert!(
        state.params.iter().any(|&x| bf16(x) != x),
        "the masters hold bf16 values only"
    );
    // LayerNorm weights start at 1; three warm-up steps (lr ≤ 3e-4 · 3/10) move them by less
    // than half a bf16 step (2⁻⁹), so only the masters can show it.
    let kept = initial
        .iter()
        .zip(&state.params)
        .zip(t.params().iter())
        .filter(|((&i, &m), &r)| i == 1.0 && m != 1.0 && r == 1.0)
        .count();
    assert!(
        kept > 0,
        "no master kept an update its bf16 copy rounds away"
    );

    let mut resumed = Trainer::resume(&be, &model, t.config, &state, t.seed).unwrap();
    let a = t.step(&be, &model, &[batch(3)]).unwrap();
    let b = resumed.step(&be, &model, &[batch(3)]).unwrap();
    assert_eq!(
        a.loss.to_bits(),
        b.loss.to_bits(),
        "the resumed loss differs"
    );
    assert!(
        t.state(&be).unwrap() == resumed.state(&be).unwrap(),
        "the resumed trainer's state differs"
    );
}
