//! `POST /v1/completions` bodies (did-serve/src/request.rs): a checked request or an API error
//! (400/404 with a message), never a panic, for a byte-level model of length 64. A checked request
//! holds one prompt, id and token budget per sequence, within the length and the batch limit.
#![no_main]
use did_engine::data::tokenizer::{Tokenizer, TokenizerKind};
use did_engine::sampling::SamplingSettings;
use did_serve::{CompletionRequest, Served};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let served = Served {
        model_id: "dit".into(),
        tokenizer: Tokenizer::new(TokenizerKind::Bytes),
        len: 64,
        defaults: SamplingSettings { stop_at_eos: true, ..SamplingSettings::default() },
        max_sequences: 16,
    };
    match CompletionRequest::from_json(data).and_then(|r| r.check(&served, 1)) {
        Ok(c) => {
            let n = c.prompts.len();
            assert!(n >= 1 && n <= 16 && c.ids.len() == n && c.max_tokens.len() == n);
            for (p, m) in c.prompts.iter().zip(&c.max_tokens) {
                assert!(*m >= 1 && p.len() + m <= 64);
            }
        }
        Err(e) => assert!(matches!(e.status, 400 | 404) && !e.message.is_empty()),
    }
});
