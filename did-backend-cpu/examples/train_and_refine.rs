//! The real network end to end on the CPU: train the `tiny` DiT (4 × 256)
//! mix-scale (block 4 with probability 0.9, the whole sequence with 0.1) on a
//! synthetic counting task, then draft with blocks of 4 and a KV cache, remask
//! the least confident 25 % by their snapshot confidence, and refine them with
//! one global block.
//!
//! `cargo run --release -p did-backend-cpu --example train_and_refine [STEPS]`

use did_backend_cpu::CpuBackend;
use did_core::model::BlockSizeDistribution;
use did_core::model::{
    diffusion_batch, Architecture, DiffusionDenoiser, ModelConfig, Trainer, TrainerConfig,
    Transformer,
};
use did_core::refine::{generate, GenerateConfig, StagePlan};
use did_core::rng::{Purpose, RngStream};
use did_core::schedule::TrainingSchedule;

const K: u32 = 16; // tokens 0..16 count up mod K
const BOS: u32 = 16;
const MASK: u32 = 17;
const L: usize = 32;

fn counting(batch: usize, step: u32) -> Vec<u32> {
    let s = RngStream::new(42, Purpose::DataOrder, 0, step);
    (0..batch)
        .flat_map(|b| {
            let a = s.u32(b as u32, 0) % K;
            std::iter::once(BOS).chain((0..L as u32 - 1).map(move |i| (a + i) % K))
        })
        .collect()
}

fn follows(seq: &[u32]) -> usize {
    seq[1..]
        .windows(2)
        .filter(|w| (w[0] + 1) % K == w[1])
        .count()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let config = ModelConfig {
        vocab_size: 18,
        mask_id: MASK,
        context: L,
        ..ModelConfig::preset("tiny", Architecture::Dit)?
    };
    let model = Transformer::new(config)?;
    let be = CpuBackend::new();
    let opt = TrainerConfig {
        lr: 1e-3,
        warmup_steps: 10,
        ema_decay: Some(0.99),
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(&be, &model, opt, &model.table().initial_values(1), 7)?;
    let blocks = "4:0.9,L:0.1".parse::<BlockSizeDistribution>()?.resolve(L)?;
    println!(
        "training {} parameters for {steps} steps (batch 8, L = {L}, mix-scale blocks {blocks:?})",
        model.table().total()
    );
    let t = std::time::Instant::now();
    for step in 0..steps {
        let block = blocks.sample(7, step);
        let batch = diffusion_batch(
            &counting(8, step),
            8,
            L,
            block,
            &TrainingSchedule::default(),
            MASK,
            7,
            step,
        )?;
        let r = trainer.step(&be, &model, &[batch])?;
        if step % 25 == 0 || step + 1 == steps {
            println!(
                "step {:>4}  NELBO {:.4}  grad norm {:.3}  lr {:.1e}",
                r.step, r.loss, r.grad_norm, r.lr
            );
        }
    }
    println!("trained in {:.1} s", t.elapsed().as_secs_f64());

    let plan: StagePlan = "4,L:0.25".parse()?;
    let gen = GenerateConfig::new(plan.resolve(L)?, 3);
    let prompts: Vec<&[u32]> = vec![&[BOS]; 4];
    let mut denoiser = DiffusionDenoiser::new(&be, &model, trainer.eval_params(), true)?;
    let g = generate(&mut denoiser, &gen, &prompts)?;
    let (draft, refined) = (&g.stages[0].tokens, &g.stages[1].tokens);
    for s in 0..4 {
        let (d, r) = (&draft[s * L..(s + 1) * L], &refined[s * L..(s + 1) * L]);
        println!(
            "draft   {:?}  ({} of {} steps count up)",
            &d[1..],
            follows(d),
            L - 2
        );
        println!(
            "refined {:?}  ({} of {}; remasked {:?})",
            &r[1..],
            follows(r),
            L - 2,
            g.stages[1].remasked[s]
        );
    }
    println!("NFE: draft {}, refine {}", g.stages[0].nfe, g.stages[1].nfe);
    Ok(())
}
