//! Any prompt, plan text and sampler settings through `generate` with a small
//! deterministic denoiser: a clean error or a fully unmasked result, never a panic.
//! Plans may name per-stage rules (`@threshold:0.9`) and adaptive remasks (`below:…`).
#![no_main]
use did_core::denoiser::{DenoiseRequest, Denoiser};
use did_core::refine::{generate, GenerateConfig, RemaskScope, RemaskStrategy, StagePlan};
use did_core::sample::{BlockUpdate, ConfidenceKind};
use libfuzzer_sys::fuzz_target;

struct Hash;
impl Denoiser for Hash {
    type Error = std::convert::Infallible;
    fn vocab_size(&self) -> usize {
        9
    }
    fn mask_id(&self) -> u32 {
        8
    }
    fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
        for (o, row) in r.outputs.iter().zip(out.chunks_mut(9)) {
            for (v, x) in row.iter_mut().enumerate() {
                *x = ((o.pos as usize * 31 + v * 17 + r.sequence(o.seq as usize)[0] as usize) % 13) as f32;
            }
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let seq_len = usize::from(data[0] % 64) + 1;
    let split = 6 + usize::from(data[1]) % (data.len() - 5);
    let (prompt, plan) = data[6..].split_at((split - 6).min(data.len() - 6));
    let Ok(plan) = std::str::from_utf8(plan) else { return };
    let Ok(plan) = plan.parse::<StagePlan>().and_then(|p| p.resolve_with(seq_len, data[2] & 1 == 0)) else { return };
    let mut cfg = GenerateConfig::new(plan, u64::from(data[3]));
    // Every update rule with a parameter from the input (zero and out-of-range ones included).
    let v = data[4] >> 3;
    cfg.sampler.update = match data[4] % 5 {
        0 => BlockUpdate::FirstHitting,
        1 => BlockUpdate::DdpmCaching { steps: u32::from(v) },
        2 => BlockUpdate::ConfidenceThreshold { tau: f64::from(v) / 24.0 },
        3 => BlockUpdate::EntropyBound { budget: f64::from(v) / 8.0 - 0.5 },
        _ => BlockUpdate::TopK { k: u32::from(v) },
    };
    cfg.sampler.confidence = [ConfidenceKind::Nucleus, ConfidenceKind::Raw, ConfidenceKind::Max][usize::from(data[3] >> 6) % 3];
    cfg.sampler.max_outputs_per_call = usize::from(data[2] >> 1);
    cfg.remask = [RemaskStrategy::Snapshot(ConfidenceKind::Max), RemaskStrategy::PostHoc, RemaskStrategy::Random][usize::from(data[5]) % 3];
    cfg.scope = if data[5] & 4 == 0 { RemaskScope::Global } else { RemaskScope::PerBlock };
    cfg.stop_at = (data[5] & 8 != 0).then_some(0);
    let prompt: Vec<u32> = prompt.iter().map(|&b| u32::from(b % 10)).collect();
    if let Ok(out) = generate(&mut Hash, &cfg, &[&prompt, &prompt]) {
        assert!(out.batch.tokens.iter().all(|&t| t != 8));
    }
});
