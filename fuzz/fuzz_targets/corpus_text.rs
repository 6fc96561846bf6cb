//! Corpus decoding (`did data prepare` on arbitrary bytes, as a text file and
//! as JSON lines): text or a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = did_engine::data::documents::decode("fuzz", data) {
        assert!(!text.contains('\r'), "line ends are normalised to LF");
        let t = did_engine::data::tokenizer::Tokenizer::new(did_engine::data::tokenizer::TokenizerKind::Gpt2);
        let _ = t.decode(&t.encode(&text));
    }
    if let Ok(docs) = did_engine::data::documents::jsonl_documents("fuzz.jsonl", data, "text") {
        assert!(docs.iter().all(|d| !d.text.contains('\r')));
    }
});
