//! Checkpoint loading (safetensors + our metadata) on arbitrary bytes: a
//! checkpoint or a clear error, never a panic or an unbounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = did_engine::checkpoint::load_bytes(data) {
        assert_eq!(c.params.len(), c.config.parameter_count());
    }
});
