//! The results files did-report reads (a gen-ppl seed, a NELBO row, a training log): figures or a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = did_report::results::parse_seed_run(Path::new("samples/mix.snapshot.seed-1.json"), text);
        let _ = did_report::results::parse_nelbo(Path::new("nelbo/mix.block-4.json"), text);
        if let Ok(m) = did_report::results::parse_metrics(Path::new("models/mix/metrics.jsonl"), text) {
            let _ = did_report::results::Stat::of(&m.loss.iter().map(|l| l.1).collect::<Vec<_>>());
        }
    }
});
