//! `did import bd3lm` on arbitrary bytes: the input is split at its first 0xFF byte into
//! config.json and model.safetensors. A checkpoint or a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let (config, weights) = (&data[..cut], data.get(cut + 1..).unwrap_or(&[]));
    if let Ok(ckpt) = did_engine::import::bd3lm_from_bytes(config, weights) {
        assert_eq!(ckpt.params.len(), did_core::model::ParamTable::new(&ckpt.config).total());
    }
});
