//! BD3-LM's evaluation protocols (docs/bd3lm.md §5) and the independent judge's: each returns a
//! report that serialises to the JSON `did eval … --json` writes (what `did-report` reads) and
//! renders as the markdown table `did eval` prints.
//!
//! - [`nelbo`]: the perplexity bound of a held-out split at a block size (exact for a causal
//!   model);
//! - [`gen_ppl`]: samples drawn (or read), degenerate ones regenerated, scored by the causal
//!   judge and optionally the word judge;
//! - [`word`]: per-word perplexity under CMU's n-gram model, and the samples' entropy.

pub mod gen_ppl;
pub mod nelbo;
pub mod word;

use std::path::Path;

use did_core::sample::stop::unigram_entropy;

use crate::samples::{parse_samples, SampleRecord};
use crate::Error;

/// Unigram entropy of the last 256 tokens (BD3-LM's degeneracy test).
///
/// ```
/// let loop_ = vec![7u32; 300];
/// assert_eq!(did_engine::eval::tail_entropy(&loop_), 0.0);
/// ```
pub fn tail_entropy(tokens: &[u32]) -> f64 {
    unigram_entropy(&tokens[tokens.len().saturating_sub(256)..])
}

/// The samples of a `did sample --out` file.
pub fn read_samples(path: &Path) -> Result<Vec<SampleRecord>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Samples(format!("cannot read {}: {e}", path.display())))?;
    parse_samples(&path.display().to_string(), &text)
}

/// `did eval entropy`: the unigram entropy of each sample of a file, and their mean.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntropyReport {
    /// Always `entropy`.
    pub metric: &'static str,
    /// The sample file.
    pub source: String,
    /// How many samples.
    pub samples: usize,
    /// Mean over samples (nats).
    pub entropy_mean: f64,
    /// Each sample's entropy.
    pub per_sample: Vec<f64>,
    /// Each sample's entropy over its last 256 tokens (the degeneracy test's).
    pub last_256_entropy: Vec<f64>,
}

impl EntropyReport {
    /// The report of the samples in `path`.
    pub fn of_file(path: &Path) -> Result<Self, Error> {
        let samples = read_samples(path)?;
        let per: Vec<f64> = samples.iter().map(|s| unigram_entropy(&s.tokens)).collect();
        Ok(EntropyReport {
            metric: "entropy",
            source: path.display().to_string(),
            samples: per.len(),
            entropy_mean: per.iter().sum::<f64>() / per.len() as f64,
            last_256_entropy: samples.iter().map(|s| tail_entropy(&s.tokens)).collect(),
            per_sample: per,
        })
    }

    /// One markdown table row under its header.
    pub fn markdown(&self) -> String {
        format!(
            "| source | samples | entropy (nats, mean) | lowest | lowest over the last 256 tokens |\n|---|---:|---:|---:|---:|\n| {} | {} | {:.3} | {:.3} | {:.3} |\n",
            self.source,
            self.samples,
            self.entropy_mean,
            self.per_sample.iter().copied().fold(f64::INFINITY, f64::min),
            self.last_256_entropy.iter().copied().fold(f64::INFINITY, f64::min),
        )
    }
}
