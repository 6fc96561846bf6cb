//! The samples file `did eval gen-ppl --samples` and `did eval entropy` read: records or a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(samples) = did_engine::samples::parse_samples("fuzz.jsonl", text) {
            assert!(!samples.is_empty());
            for s in &samples {
                let _ = did_core::sample::stop::unigram_entropy(&s.tokens);
            }
        }
    }
});
