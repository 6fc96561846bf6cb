//! Any text as a mix-scale block-size distribution: an error, never a panic.
#![no_main]
use did_core::model::BlockSizeDistribution;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let seq_len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    if let Ok(text) = std::str::from_utf8(&data[2..]) {
        if let Ok(d) = text.parse::<BlockSizeDistribution>() {
            if let Ok(r) = d.resolve(seq_len) {
                let b = r.sample(0, u32::from(data[0]));
                assert!(r.entries().iter().any(|&(s, _)| s == b));
            }
        }
    }
});
