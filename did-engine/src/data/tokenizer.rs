//! The two tokenizers: GPT-2's BPE (tiktoken's `r50k_base`, compiled in) and raw bytes.

use crate::Error;
use std::fmt;
use std::str::FromStr;

/// Which tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenizerKind {
    /// One token per byte; EOS 256, `[MASK]` 257.
    Bytes,
    /// GPT-2 BPE; EOS 50256, `[MASK]` 50257 (BD3-LM's convention).
    Gpt2,
}

impl TokenizerKind {
    /// The id stored in shard headers.
    pub fn id(self) -> u32 {
        match self {
            TokenizerKind::Bytes => 0,
            TokenizerKind::Gpt2 => 1,
        }
    }
    /// The tokenizer stored as `id`.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(TokenizerKind::Bytes),
            1 => Some(TokenizerKind::Gpt2),
            _ => None,
        }
    }
    /// End of document (and BOS).
    pub fn eos(self) -> u32 {
        match self {
            TokenizerKind::Bytes => 256,
            TokenizerKind::Gpt2 => did_core::GPT2_EOS,
        }
    }
    /// `[MASK]`, the last id.
    pub fn mask(self) -> u32 {
        self.eos() + 1
    }
    /// Vocabulary size including `[MASK]`.
    pub fn vocab_size(self) -> u32 {
        self.mask() + 1
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenizerKind::Bytes => "bytes",
            TokenizerKind::Gpt2 => "gpt2",
        })
    }
}

impl FromStr for TokenizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "gpt2" => Ok(TokenizerKind::Gpt2),
            "bytes" => Ok(TokenizerKind::Bytes),
            other => Err(Error::Corpus(format!(
                "unknown tokenizer {other:?}; use `gpt2` or `bytes`"
            ))),
        }
    }
}

/// A tokenizer ready to encode and decode.
#[derive(Clone)]
pub struct Tokenizer {
    kind: TokenizerKind,
    bpe: Option<&'static tiktoken_rs::CoreBPE>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .finish()
    }
}

impl Tokenizer {
    /// The tokenizer of `kind`.
    pub fn new(kind: TokenizerKind) -> Self {
        let bpe = (kind == TokenizerKind::Gpt2).then(tiktoken_rs::r50k_base_singleton);
        Tokenizer { kind, bpe }
    }

    /// Which one.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Tokens of `text` (no special tokens: `<|endoftext|>` in the text is ordinary text).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.bpe {
            Some(bpe) => bpe.encode_ordinary(text),
            None => text.bytes().map(u32::from).collect(),
        }
    }

    /// Text of `tokens`; EOS shows as a newline, `[MASK]` as `[MASK]`, invalid UTF-8 lossily.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let (eos, mask) = (self.kind.eos(), self.kind.mask());
        let mut out = String::new();
        let mut run: Vec<u32> = Vec::new();
        let flush = |run: &mut Vec<u32>, out: &mut String| {
            if run.is_empty() {
                return;
            }
            let bytes = match self.bpe {
                Some(bpe) => bpe.decode_bytes(run).unwrap_or_default(),
                None => run.iter().map(|&t| t as u8).collect(),
            };
            out.push_str(&String::from_utf8_lossy(&bytes));
            run.clear();
        };
        for &t in tokens {
            if t == eos || t == mask || t > mask {
                flush(&mut run, &mut out);
                out.push_str(if t == eos { "\n" } else { "[MASK]" });
            } else {
                run.push(t);
            }
        }
        flush(&mut run, &mut out);
        out
    }
}

/// The tokenizer whose vocabulary a model of `vocab` ids uses: `gpt2` (50,258) or `bytes` (258).
///
/// ```
/// use did_engine::data::tokenizer::{tokenizer_for, TokenizerKind};
/// assert_eq!(tokenizer_for(258)?, TokenizerKind::Bytes);
/// assert!(tokenizer_for(1000).is_err());
/// # Ok::<(), did_engine::Error>(())
/// ```
pub fn tokenizer_for(vocab: usize) -> Result<TokenizerKind, Error> {
    [TokenizerKind::Gpt2, TokenizerKind::Bytes]
        .into_iter()
        .find(|k| k.vocab_size() as usize == vocab)
        .ok_or_else(|| {
            Error::Config(format!(
                "a vocabulary of {vocab} matches neither the gpt2 (50258) nor the bytes (258) tokenizer"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_round_trip_and_known_ids() {
        let t = Tokenizer::new(TokenizerKind::Gpt2);
        let ids = t.encode("Hello world");
        assert_eq!(ids, vec![15496, 995]);
        assert_eq!(t.decode(&ids), "Hello world");
        assert_eq!(t.decode(&[15496, 50257, 995]), "Hello[MASK] world");
        // The special token's text is ordinary text, never id 50256.
        assert!(!t.encode("<|endoftext|>").contains(&50256));
    }

    #[test]
    fn bytes_round_trip() {
        let t = Tokenizer::new(TokenizerKind::Bytes);
        assert_eq!(t.encode("hé"), vec![104, 195, 169]);
        assert_eq!(t.decode(&[104, 195, 169, 256, 257]), "hé\n[MASK]");
        assert_eq!(TokenizerKind::Bytes.vocab_size(), 258);
    }
}
