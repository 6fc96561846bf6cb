//! The independent judge: per-word perplexity of sample texts under a CMU Sphinx trie n-gram model
//! ([`crate::ngram_judge`]), pooled and per sample, with OOV words skipped or charged the rarest
//! word's probability (docs/results/judges.md says why both).

use std::path::Path;

use did_core::sample::stop::unigram_entropy;

use super::read_samples;
use crate::ngram_judge::{words, NgramLm, WordScore};
use crate::Error;

/// Reads an n-gram model, with the fix when it is missing.
pub fn load_ngram(path: &Path) -> Result<NgramLm, Error> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::Judge(format!(
            "cannot read {}: {e}; fetch CMU's model with scripts/fetch-judges.sh",
            path.display()
        ))
    })?;
    NgramLm::from_bytes(bytes).map_err(|e| Error::Judge(format!("{}: {e}", path.display())))
}

/// Texts scored by the word judge: pooled and per sample.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WordJudgement {
    /// The model's file.
    pub judge: Option<String>,
    /// Words scored over every text (OOV words not).
    pub words_scored: usize,
    /// Words the model does not know.
    pub oov: usize,
    /// oov / (scored + oov).
    pub oov_rate: f64,
    /// Perplexity over every scored word, OOV words skipped.
    pub word_ppl_pooled: f64,
    /// The mean of each text's perplexity.
    pub word_ppl_mean_of_samples: f64,
    /// Pooled perplexity with each OOV word charged `oov_charge_ln_prob`.
    pub word_ppl_oov_charged: f64,
    /// ln P of the model's rarest word.
    pub oov_charge_ln_prob: f64,
    /// Each text's perplexity.
    pub per_sample_word_ppl: Vec<f64>,
}

impl WordJudgement {
    /// Scores `texts` under `lm` (read from `path`, named in the report).
    pub fn of(lm: &NgramLm, path: Option<&Path>, texts: impl Iterator<Item = String>) -> Self {
        let mut total = WordScore::default();
        let per: Vec<WordScore> = texts
            .map(|t| {
                let s = lm.score_sentence(&words(&t));
                total.add(s);
                s
            })
            .collect();
        let per_sample: Vec<f64> = per.iter().map(WordScore::perplexity).collect();
        WordJudgement {
            judge: path.map(|p| p.display().to_string()),
            words_scored: total.scored,
            oov: total.oov,
            oov_rate: total.oov_rate(),
            word_ppl_pooled: total.perplexity(),
            word_ppl_mean_of_samples: per_sample.iter().sum::<f64>() / per.len().max(1) as f64,
            word_ppl_oov_charged: total.perplexity_charging_oov(lm.rarest_ln_prob()),
            oov_charge_ln_prob: lm.rarest_ln_prob(),
            per_sample_word_ppl: per_sample,
        }
    }

    /// The table `did eval gen-ppl --word-judge` adds.
    pub fn markdown(&self) -> String {
        format!(
            "\n| word judge | words scored | OOV | word perplexity (pooled, OOV skipped) | mean of per-sample | OOV charged as the rarest word |\n|---|---:|---:|---:|---:|---:|\n| {} | {} | {:.2} % | {:.1} | {:.1} | {:.1} |\n",
            self.judge.as_deref().unwrap_or(""),
            self.words_scored,
            100.0 * self.oov_rate,
            self.word_ppl_pooled,
            self.word_ppl_mean_of_samples,
            self.word_ppl_oov_charged,
        )
    }
}

/// `did eval word-ppl`: the word judge on the texts of a sample file, with their token entropy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WordPplReport {
    /// Always `word_ppl`.
    pub metric: &'static str,
    /// The n-gram order of the model.
    pub judge_order: usize,
    /// The sample file.
    pub source: String,
    /// How many samples.
    pub samples: usize,
    /// The samples' mean unigram token entropy (nats).
    pub entropy_mean: f64,
    /// The scores.
    #[serde(flatten)]
    pub words: WordJudgement,
}

impl WordPplReport {
    /// Scores the texts of the samples in `path` under the model in `lm_path`.
    pub fn of_file(path: &Path, lm_path: &Path) -> Result<Self, Error> {
        let samples = read_samples(path)?;
        let lm = load_ngram(lm_path)?;
        let mut texts = Vec::with_capacity(samples.len());
        for (i, s) in samples.iter().enumerate() {
            texts.push(s.text.clone().ok_or_else(|| {
                Error::Samples(format!(
                    "{} line {}: no \"text\"; word perplexity needs the decoded text `did sample --out` writes",
                    path.display(),
                    i + 1
                ))
            })?);
        }
        let entropy_mean = samples
            .iter()
            .map(|s| unigram_entropy(&s.tokens))
            .sum::<f64>()
            / samples.len() as f64;
        Ok(WordPplReport {
            metric: "word_ppl",
            judge_order: lm.order(),
            source: path.display().to_string(),
            samples: samples.len(),
            entropy_mean,
            words: WordJudgement::of(&lm, Some(lm_path), texts.into_iter()),
        })
    }

    /// One markdown table row under its header.
    pub fn markdown(&self) -> String {
        let w = &self.words;
        format!(
            "| source | samples | words scored | OOV | word perplexity (pooled, OOV skipped) | mean of per-sample | OOV charged as the rarest word | entropy (nats, tokens) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {:.2} % | {:.1} | {:.1} | {:.1} | {:.3} |\n",
            self.source,
            self.samples,
            w.words_scored,
            100.0 * w.oov_rate,
            w.word_ppl_pooled,
            w.word_ppl_mean_of_samples,
            w.word_ppl_oov_charged,
            self.entropy_mean,
        )
    }
}
