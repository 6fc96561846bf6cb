//! Any text as a stage plan, checked against any length: an error, never a panic.
#![no_main]
use did_core::refine::StagePlan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let seq_len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    if let Ok(text) = std::str::from_utf8(&data[2..]) {
        if let Ok(plan) = text.parse::<StagePlan>() {
            let again: StagePlan = plan.to_string().parse().expect("a displayed plan parses");
            assert_eq!(again, plan);
            let _ = plan.resolve(seq_len);
            let _ = plan.resolve_with(seq_len, false);
        }
    }
});
