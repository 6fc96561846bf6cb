//! A completion's text from its tokens: after the prompt, up to the first end-of-text token, at
//! most `max_tokens`, and before the first stop text, with OpenAI's finish reason.

use did_engine::data::tokenizer::Tokenizer;

/// What a choice returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionText {
    /// The text.
    pub text: String,
    /// The tokens it holds.
    pub tokens: usize,
    /// `stop` (an end-of-text token or a stop text ended it) or `length`.
    pub finish_reason: &'static str,
}

/// The completion of `tokens` (BOS and prompt first: `prompt` tokens).
///
/// ```
/// use did_engine::data::tokenizer::{Tokenizer, TokenizerKind};
/// let bytes = Tokenizer::new(TokenizerKind::Bytes);
/// let t = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();
/// let tokens = [vec![256], t("Hi"), t(" there. Bye"), vec![256]].concat();
/// let full = did_serve::completion_text(&bytes, &tokens, 3, 100, &[]);
/// assert_eq!((full.text.as_str(), full.finish_reason), (" there. Bye", "stop"));
/// let short = did_serve::completion_text(&bytes, &tokens, 3, 6, &[]);
/// assert_eq!((short.text.as_str(), short.finish_reason), (" there", "length"));
/// let stopped = did_serve::completion_text(&bytes, &tokens, 3, 100, &[".".into()]);
/// assert_eq!((stopped.text.as_str(), stopped.tokens), (" there", 6));
/// ```
pub fn completion_text(
    tokenizer: &Tokenizer,
    tokens: &[u32],
    prompt: usize,
    max_tokens: usize,
    stop: &[String],
) -> CompletionText {
    let eos = tokenizer.kind().eos();
    let drawn = tokens.get(prompt..).unwrap_or_default();
    let until_eos = drawn.iter().position(|&t| t == eos);
    let end = until_eos.unwrap_or(drawn.len()).min(max_tokens);
    let kept = &drawn[..end];
    let mut text = tokenizer.decode(kept);
    let mut count = kept.len();
    let mut finish = if until_eos.is_some_and(|e| e <= max_tokens) {
        "stop"
    } else {
        "length"
    };
    if let Some(cut) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
        count = tokenizer.encode(&text).len();
        finish = "stop";
    }
    CompletionText {
        text,
        tokens: count,
        finish_reason: finish,
    }
}
