//! The TOML run file: any text gives a model config (its [model] table) and
//! training settings (its [train] table), or errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = did_engine::model_config::from_toml(text) {
            // A config that validates can be laid out and sized.
            let _ = config.parameter_count();
        }
        let _ = did_engine::train_config::parse(text);
    }
});
