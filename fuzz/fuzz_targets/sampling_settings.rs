//! Sampling settings as JSON (what a run file or a server request carries,
//! did-engine/src/sampling/mod.rs): settings or a serde error, never a panic; settings that parse
//! resolve against a model's length to a plan or a clear error.
#![no_main]
use did_engine::sampling::{remask_strategy, SamplingSettings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = serde_json::from_slice::<SamplingSettings>(data) else { return };
    let _ = remask_strategy(&s.remask);
    if let Ok(plan) = s.stages.parse::<did_core::refine::StagePlan>() {
        let _ = plan.resolve_with(s.length.unwrap_or(128).clamp(1, 4096), !s.local_final);
    }
    let _ = s.sampler.parse::<did_core::sample::BlockUpdate>();
    if let Ok(format) = s.weights.parse::<did_core::backend::WeightFormat>() {
        assert_eq!(format.name().parse(), Ok(format), "a weight format's name parses back");
    }
    let _ = did_core::sample::Nucleus::new(s.top_p, did_core::sample::nucleus::NucleusRule::default());
});
