//! Where draft → refine sampling of `tiny` spends its time (op breakdown).
//! Run: `cargo run --release -p did-benches --example profile_sampling`.
use did_backend_cpu::CpuBackend;
use did_benches::profile::Profiled;
use did_core::backend::prelude::*;
use did_core::model::{Architecture, DiffusionDenoiser, ModelConfig, Transformer};
use did_core::refine::{generate, GenerateConfig, StagePlan};

fn main() {
    let config = ModelConfig::preset("tiny", Architecture::Dit).expect("tiny");
    let be = Profiled::new(CpuBackend::new());
    let model = Transformer::new(config).expect("valid");
    let params = be
        .upload(&model.table().random_values(2, 0.05))
        .expect("upload");
    let plan: StagePlan = "4,L:0.25".parse().expect("plan");
    let gen = GenerateConfig::new(plan.resolve(config.context).expect("plan"), 9);
    let prompt = [did_core::GPT2_EOS];
    let t = std::time::Instant::now();
    let mut d = DiffusionDenoiser::new(&be, &model, &params, true).expect("denoiser");
    let g = generate(&mut d, &gen, &[&prompt]).expect("generate");
    let total = t.elapsed();
    println!("total {total:?}, NFE {}", g.nfe());
    let mut times: Vec<_> = be.times().into_iter().collect();
    times.sort_by_key(|t| std::cmp::Reverse(t.1.time));
    for (op, t) in times.iter().take(12) {
        println!(
            "{op:24} {:>8.1} ms  {:>6} calls",
            t.time.as_secs_f64() * 1e3,
            t.calls
        );
    }
}
