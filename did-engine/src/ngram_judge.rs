//! The second, independent judge of generated text: CMU PocketSphinx's
//! generic US-English word trigram model (`en-us.lm.bin`, which nobody here
//! trained), read from its binary trie format by our own code, and per-word
//! perplexity under it.
//!
//! The file ("Trie Language Model", sphinxbase's `ngram_model_trie`):
//!
//! | what | layout |
//! |---|---|
//! | header | the 19 bytes `Trie Language Model`, u8 order N, N × u32 n-gram counts |
//! | quantiser | u32 (unused), then f32 tables: for each middle order a 2¹⁶-entry probability and a 2¹⁶-entry backoff table, then a 2¹⁶-entry probability table for order N |
//! | unigrams | counts[0] + 1 × {f32 prob, f32 backoff, u32 first child}; the extra entry closes the last range |
//! | n-grams | per middle order a bit-packed array of {word, 16-bit backoff code, 16-bit probability code, first child}, then order N's {word, 16-bit probability code}; each array is `(entries + 1) × bits` rounded up to bytes, plus 8 bytes of padding |
//! | vocabulary | u32 byte length, then the words, each NUL-terminated, in id order |
//!
//! The trie is reversed: a unigram's children are the words that precede it,
//! sorted by id, so `P(w | h₂ h₁)` is found at w → h₁ → h₂. Values are logs in
//! base 1.0001. Scoring is ARPA back-off: the longest stored n-gram's
//! probability plus the backoff weights of the longer contexts that are not
//! stored. Everything is little-endian (the files are written on x86).

use crate::Error;
use std::collections::HashMap;

/// Natural log of the base the file's values are logs in.
const LN_BASE: f64 = 9.999_500_033_330_834e-5; // ln(1.0001)

const HEADER: &[u8] = b"Trie Language Model";
const QUANT_BITS: u32 = 16;

/// One bit-packed n-gram array.
#[derive(Debug, Clone, Copy)]
struct Level {
    /// Byte offset of the array in the file.
    start: usize,
    word_bits: u32,
    /// Bits of the quantised values: 32 (backoff, probability) in middle orders, 16 (probability) in the last.
    quant_bits: u32,
    next_bits: u32,
    total_bits: u32,
    entries: u32,
}

/// A word n-gram model in CMU Sphinx's binary trie format.
pub struct NgramLm {
    bytes: Vec<u8>,
    order: usize,
    counts: Vec<u32>,
    /// f32 quantisation tables, in the file's order.
    tables: Vec<f32>,
    /// (prob, backoff, first child) per unigram, plus the closing entry.
    unigrams: Vec<(f32, f32, u32)>,
    levels: Vec<Level>,
    words: HashMap<String, u32>,
    start_id: Option<u32>,
    end_id: Option<u32>,
}

fn bits_for(max: u32) -> u32 {
    32 - max.leading_zeros()
}

impl NgramLm {
    /// Reads a model from the bytes of its file; every size is checked
    /// against the file before anything is read, and a bad file is an error
    /// that says what is wrong.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, Error> {
        let bad =
            |what: &str| Error::Judge(format!("not a CMU Sphinx trie language model: {what}"));
        if !bytes.starts_with(HEADER) {
            return Err(bad("it does not start with \"Trie Language Model\" (ARPA and DMP files are not read; convert with sphinx_lm_convert)"));
        }
        let mut at = HEADER.len();
        let order = usize::from(*bytes.get(at).ok_or_else(|| bad("truncated header"))?);
        at += 1;
        if !(2..=5).contains(&order) {
            return Err(bad(&format!("order {order}; 2 to 5 are read")));
        }
        let u32_at = |o: usize| -> Result<u32, Error> {
            bytes
                .get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad("truncated"))
        };
        let counts: Vec<u32> = (0..order)
            .map(|i| u32_at(at + 4 * i))
            .collect::<Result<_, _>>()?;
        at += 4 * order;
        if counts[0] == 0 || counts.iter().any(|&c| c >= 1 << 25) {
            return Err(bad(&format!("n-gram counts {counts:?}")));
        }
        at += 4; // quantiser type, unused
        let n_tables = (order - 2) * 2 + 1;
        let table_len = n_tables << QUANT_BITS;
        let tables_end = at + 4 * table_len;
        let tables: Vec<f32> = bytes
            .get(at..tables_end)
            .ok_or_else(|| bad("truncated quantisation tables"))?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        at = tables_end;
        let n_uni = counts[0] as usize + 1;
        let unigrams: Vec<(f32, f32, u32)> = bytes
            .get(at..at + 12 * n_uni)
            .ok_or_else(|| bad("truncated unigrams"))?
            .chunks_exact(12)
            .map(|c| {
                (
                    f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    f32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                    u32::from_le_bytes([c[8], c[9], c[10], c[11]]),
                )
            })
            .collect();
        at += 12 * n_uni;
        let word_bits = bits_for(counts[0]);
        let mut levels = Vec::with_capacity(order - 1);
        for n in 1..order {
            let last = n == order - 1;
            let next_bits = if last { 0 } else { bits_for(counts[n + 1]) };
            let quant_bits = if last { QUANT_BITS } else { 2 * QUANT_BITS };
            let total_bits = word_bits + quant_bits + next_bits;
            let size = ((1 + counts[n] as usize) * total_bits as usize).div_ceil(8) + 8;
            levels.push(Level {
                start: at,
                word_bits,
                quant_bits,
                next_bits,
                total_bits,
                entries: counts[n],
            });
            at += size;
        }
        if at > bytes.len() {
            return Err(bad("truncated n-gram arrays"));
        }
        let vocab_len = u32_at(at)? as usize;
        at += 4;
        let vocab = bytes
            .get(at..at + vocab_len)
            .ok_or_else(|| bad("truncated vocabulary"))?;
        let mut words = HashMap::with_capacity(n_uni);
        let mut id = 0u32;
        for w in vocab.split(|&b| b == 0).take(counts[0] as usize) {
            let w = String::from_utf8_lossy(w).into_owned();
            words.entry(w).or_insert(id);
            id += 1;
        }
        if id != counts[0] {
            return Err(bad(&format!(
                "{id} words in the vocabulary, {} unigrams",
                counts[0]
            )));
        }
        // Scores are sums of these: finite values keep every score a number.
        if tables.iter().any(|v| !v.is_finite())
            || unigrams
                .iter()
                .any(|u| !u.0.is_finite() || !u.1.is_finite())
        {
            return Err(bad(
                "a probability or backoff weight is not a finite number (corrupt file)",
            ));
        }
        // Child ranges must lie inside the next array, or lookups would read past it.
        let children = |n: usize| counts.get(n).copied().unwrap_or(0);
        if unigrams.iter().any(|u| u.2 > children(1)) {
            return Err(bad("a unigram's children lie outside the bigram array"));
        }
        let start_id = words.get("<s>").copied();
        let end_id = words.get("</s>").copied();
        Ok(Self {
            bytes,
            order,
            counts,
            tables,
            unigrams,
            levels,
            words,
            start_id,
            end_id,
        })
    }

    /// ln P of the rarest word (the smallest unigram probability but `<s>`'s):
    /// what an OOV word is charged when OOVs are not skipped.
    pub fn rarest_ln_prob(&self) -> f64 {
        let floor = self.unigrams[..self.counts[0] as usize]
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i as u32) != self.start_id)
            .map(|(_, u)| u.0)
            .fold(f32::INFINITY, f32::min);
        f64::from(floor) * LN_BASE
    }

    /// The model's order (3 for a trigram model).
    pub fn order(&self) -> usize {
        self.order
    }

    /// N-gram counts from the header.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// The id of a word, if the model knows it.
    pub fn id(&self, word: &str) -> Option<u32> {
        self.words.get(word).copied()
    }

    /// `bits` bits at bit `offset` of the array `level` (at most 25 bits, as the format packs them).
    fn read_bits(&self, level: &Level, offset: u64, bits: u32) -> u32 {
        let byte = level.start + (offset / 8) as usize;
        let mut b = [0u8; 4];
        for (k, slot) in b.iter_mut().enumerate() {
            *slot = self.bytes.get(byte + k).copied().unwrap_or(0);
        }
        let v = u32::from_le_bytes(b) >> (offset % 8);
        if bits >= 32 {
            v
        } else {
            v & ((1u32 << bits) - 1)
        }
    }

    fn entry_word(&self, level: &Level, i: u32) -> u32 {
        self.read_bits(
            level,
            u64::from(i) * u64::from(level.total_bits),
            level.word_bits,
        )
    }

    /// The entry of `word` among entries `range` of `level` (sorted by word id).
    fn find(&self, level: &Level, range: (u32, u32), word: u32) -> Option<u32> {
        let (mut lo, mut hi) = (range.0, range.1.min(level.entries));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let w = self.entry_word(level, mid);
            match w.cmp(&word) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// A middle entry's quantised (probability, backoff), and its children.
    fn middle(&self, n: usize, i: u32) -> (f32, f32, (u32, u32)) {
        let level = &self.levels[n];
        let base = u64::from(i) * u64::from(level.total_bits) + u64::from(level.word_bits);
        let bo = self.read_bits(level, base, QUANT_BITS) as usize;
        let prob = self.read_bits(level, base + u64::from(QUANT_BITS), QUANT_BITS) as usize;
        let next = base + u64::from(level.quant_bits);
        let begin = self.read_bits(level, next, level.next_bits);
        let end = self.read_bits(level, next + u64::from(level.total_bits), level.next_bits);
        let table = (2 * n) << QUANT_BITS;
        (
            self.tables[table + prob],
            self.tables[table + (1 << QUANT_BITS) + bo],
            (begin, end),
        )
    }

    fn longest_prob(&self, i: u32) -> f32 {
        let n = self.order - 2;
        let level = &self.levels[n];
        let base = u64::from(i) * u64::from(level.total_bits) + u64::from(level.word_bits);
        let code = self.read_bits(level, base, QUANT_BITS) as usize;
        self.tables[((2 * n) << QUANT_BITS) + code]
    }

    fn children(&self, w: u32) -> (u32, u32) {
        (self.unigrams[w as usize].2, self.unigrams[w as usize + 1].2)
    }

    /// The backoff weight of the context `hist[k] … hist[0]` (0 if it is not stored).
    fn backoff(&self, hist: &[u32], k: usize) -> f32 {
        if k == 0 {
            return self.unigrams[hist[0] as usize].1;
        }
        let mut range = self.children(hist[0]);
        let mut bo = 0.0;
        for n in 0..k {
            let Some(i) = self.find(&self.levels[n], range, hist[n + 1]) else {
                return 0.0;
            };
            let (_, b, next) = self.middle(n, i);
            bo = b;
            range = next;
        }
        bo
    }

    /// ln P(`w` | `hist`), `hist` most recent first, ids from [`NgramLm::id`]
    /// (an id the model does not have is an impossible word: −∞).
    pub fn ln_prob(&self, w: u32, hist: &[u32]) -> f64 {
        let n = self.counts[0];
        if w >= n || hist.iter().any(|&h| h >= n) {
            return f64::NEG_INFINITY;
        }
        f64::from(self.log_prob(w, hist)) * LN_BASE
    }

    /// log P in the file's units (log base 1.0001).
    fn log_prob(&self, w: u32, hist: &[u32]) -> f32 {
        let hist = &hist[..hist.len().min(self.order - 1)];
        let mut prob = self.unigrams[w as usize].0;
        let mut range = self.children(w);
        let mut matched = 0;
        for (n, &h) in hist.iter().enumerate() {
            if range.0 >= range.1 {
                break;
            }
            let level = &self.levels[n];
            let Some(i) = self.find(level, range, h) else {
                break;
            };
            matched = n + 1;
            if n == self.order - 2 {
                prob = self.longest_prob(i);
                break;
            }
            let (p, _, next) = self.middle(n, i);
            prob = p;
            range = next;
        }
        // Added one at a time, in the order CMU's code adds them (f32).
        for k in matched..hist.len() {
            prob += self.backoff(hist, k);
        }
        prob
    }
}

/// Words as the judge sees them: lowercased, split at everything that is
/// neither a letter nor an apostrophe (so "well-known" is two words), with
/// apostrophes kept inside words ("don't") and stripped at their ends; tokens
/// with digits are dropped (the model spells numbers out, and a generated
/// number has no one spelling).
///
/// ```
/// use did_engine::ngram_judge::words;
/// assert_eq!(words("Don't stop, 'Mr. Well-Known' in 1999!"), ["don't", "stop", "mr", "well", "known", "in"]);
/// ```
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '\u{2019}'))
        .map(|t| t.replace('\u{2019}', "'").trim_matches('\'').to_lowercase())
        .filter(|t| !t.is_empty() && !t.chars().any(|c| c.is_numeric()))
        .collect()
}

/// Totals of a scored text.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WordScore {
    /// Words scored (the end-of-sentence marker included, OOV words not).
    pub scored: usize,
    /// Words the model does not know (skipped; the history restarts after them).
    pub oov: usize,
    /// Sum of ln P over the scored words.
    pub ln_prob: f64,
}

impl WordScore {
    /// exp(−mean ln P) per scored word.
    pub fn perplexity(&self) -> f64 {
        (-self.ln_prob / self.scored.max(1) as f64).exp()
    }

    /// exp(−mean ln P) per word with every OOV word charged `oov_ln_prob`
    /// ([`NgramLm::rarest_ln_prob`]): skipping OOVs flatters text made of
    /// non-words, charging them does not.
    pub fn perplexity_charging_oov(&self, oov_ln_prob: f64) -> f64 {
        let n = (self.scored + self.oov).max(1) as f64;
        (-(self.ln_prob + self.oov as f64 * oov_ln_prob) / n).exp()
    }

    /// The fraction of words that were out of vocabulary.
    pub fn oov_rate(&self) -> f64 {
        self.oov as f64 / (self.scored + self.oov).max(1) as f64
    }

    /// Adds another text's totals.
    pub fn add(&mut self, other: WordScore) {
        self.scored += other.scored;
        self.oov += other.oov;
        self.ln_prob += other.ln_prob;
    }
}

impl NgramLm {
    /// Scores `words` as one sentence, `<s> w₁ … wₙ </s>`, as CMU's
    /// `sphinx_lm_eval` does: `<s>` is context only, an OOV word is skipped
    /// and counted, and the history restarts after it.
    pub fn score_sentence<S: AsRef<str>>(&self, words: &[S]) -> WordScore {
        let mut ids: Vec<Option<u32>> = Vec::with_capacity(words.len() + 2);
        ids.push(self.start_id);
        ids.extend(words.iter().map(|w| self.id(w.as_ref())));
        ids.push(self.end_id);
        let mut score = WordScore::default();
        for i in 1..ids.len() {
            let Some(w) = ids[i] else {
                score.oov += 1;
                continue;
            };
            let hist: Vec<u32> = ids[..i]
                .iter()
                .rev()
                .take(self.order - 1)
                .map_while(|h| *h)
                .collect();
            score.scored += 1;
            score.ln_prob += self.ln_prob(w, &hist);
        }
        score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> NgramLm {
        let gz = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ngram/tiny.lm.bin.gz"
        ))
        .unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut bytes).unwrap();
        NgramLm::from_bytes(bytes).unwrap()
    }

    /// Every per-word score `sphinx_lm_eval -verbose yes` printed for
    /// tests/fixtures/ngram/tiny.txt (integers: log base 1.0001, truncated),
    /// covering full trigrams, both back-off depths, a missing context,
    /// an OOV word and the history restart after it.
    #[test]
    fn per_word_scores_match_cmus_evaluator() {
        let lm = tiny();
        assert_eq!(lm.counts(), [8, 9, 4]);
        let expected: [&[i64]; 4] = [
            &[-4605, -2302, -4605, -3454, -9901, -1151, -6908],
            &[-4605, -23027, -21184, -10822, -9901, -14046, -34540],
            &[-29935, -19572, -35691, -32237, -33389, -25329, -26481],
            &[-4605, -27632, -9210, -9901, -1151, -6908],
        ];
        let lines = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ngram/tiny.txt"
        ))
        .unwrap();
        for (line, want) in lines.lines().zip(expected) {
            let w: Vec<&str> = line
                .split_whitespace()
                .filter(|w| !w.starts_with("<"))
                .collect();
            let ids: Vec<Option<u32>> = w.iter().map(|w| lm.id(w)).collect();
            let mut got = Vec::new();
            let mut all: Vec<Option<u32>> = vec![lm.start_id];
            all.extend(ids);
            all.push(lm.end_id);
            for i in 1..all.len() {
                let Some(wid) = all[i] else { continue };
                let hist: Vec<u32> = all[..i].iter().rev().take(2).map_while(|h| *h).collect();
                got.push(lm.log_prob(wid, &hist) as i64);
            }
            assert_eq!(got, want, "{line}");
        }
        let bird = lm.score_sentence(&["the", "bird", "sat", "on", "the", "mat"]);
        assert_eq!((bird.scored, bird.oov), (6, 1));
        // Charged, "bird" costs what the rarest word ("dog", log10 P = −1.6) does.
        let floor = lm.rarest_ln_prob();
        assert!(
            (floor - (-1.6 * std::f64::consts::LN_10)).abs() < 1e-3,
            "{floor}"
        );
        let charged = (-(bird.ln_prob + floor) / 7.0).exp();
        assert!((bird.perplexity_charging_oov(floor) - charged).abs() < 1e-9);
        assert!(bird.perplexity_charging_oov(floor) > bird.perplexity());
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(NgramLm::from_bytes(b"\\data\\\nngram 1=3".to_vec())
            .err()
            .unwrap()
            .to_string()
            .contains("ARPA"));
        let mut bytes = tiny().bytes;
        bytes.truncate(bytes.len() - 10);
        assert!(NgramLm::from_bytes(bytes)
            .err()
            .unwrap()
            .to_string()
            .contains("truncated"));
    }
}
