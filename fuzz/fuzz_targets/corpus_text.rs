//! Corpus decoding (`did data prepare` on arbitrary bytes): text or a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = did_cli::data::documents::decode("fuzz", data) {
        assert!(!text.contains('\r'), "line ends are normalised to LF");
        let t = did_cli::data::tokenizer::Tokenizer::new(did_cli::data::tokenizer::TokenizerKind::Gpt2);
        let _ = t.decode(&t.encode(&text));
    }
});
