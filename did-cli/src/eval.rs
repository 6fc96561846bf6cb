//! `did eval`: the NELBO perplexity of a held-out split, the generative perplexity of samples
//! under a causal judge (BD3-LM's protocol, docs/bd3lm.md §5), and the entropy and word perplexity
//! of samples. The protocols are did-engine's (`did_engine::eval`); this module holds their flags,
//! prints each report's markdown table and writes its JSON.

use std::path::{Path, PathBuf};

use did_core::backend::Backend;
use did_engine::eval::gen_ppl::{GenPplSettings, SampleSource};
use did_engine::eval::nelbo::NelboSettings;
use did_engine::eval::word::WordPplReport;
use did_engine::eval::EntropyReport;

use crate::sample::SamplingArgs;

/// Where a result goes besides stdout.
fn write_json(path: &Option<PathBuf>, report: &impl serde::Serialize) -> Result<(), String> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        std::fs::write(p, text + "\n").map_err(|e| {
            format!(
                "cannot write {}: {e}; choose a writable --json path",
                p.display()
            )
        })?;
    }
    Ok(())
}

// ---- NELBO ------------------------------------------------------------------------------------

/// Everything `did eval nelbo` is told (its command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct NelboOptions {
    /// A `did train` checkpoint (diffusion, or causal for its exact perplexity).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Folder with valid.bin and test.bin (from `did data prepare`).
    #[arg(long, default_value = "data/prepared")]
    pub data: PathBuf,
    /// valid or test.
    #[arg(long, default_value = "valid")]
    pub split: String,
    /// Block size of the bound (required for diffusion models: 4, 16, …, or the length for MDLM's).
    #[arg(long)]
    pub block: Option<usize>,
    /// Sequence length (default: the model's context).
    #[arg(long)]
    pub length: Option<usize>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Evaluate at most this many sequences (default: the whole split).
    #[arg(long)]
    pub max_sequences: Option<usize>,
    /// Seed of the diffusion times and masks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Use the trained weights instead of the EMA weights.
    #[arg(long)]
    pub no_ema: bool,
    /// Also write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `did eval nelbo`: the bound's table, and its JSON where asked.
pub fn nelbo<B: Backend>(be: &B, opts: &NelboOptions) -> Result<String, String> {
    let report = did_engine::eval::nelbo::nelbo(
        be,
        &NelboSettings {
            checkpoint: opts.checkpoint.clone(),
            data: opts.data.clone(),
            split: opts.split.clone(),
            block: opts.block,
            length: opts.length,
            batch: opts.batch,
            max_sequences: opts.max_sequences,
            seed: opts.seed,
            no_ema: opts.no_ema,
        },
    )?;
    write_json(&opts.json, &report)?;
    Ok(report.markdown())
}

// ---- generative perplexity ---------------------------------------------------------------------------

/// Everything `did eval gen-ppl` is told (its command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct GenPplOptions {
    /// The diffusion checkpoint to sample from.
    #[arg(long, conflicts_with = "samples")]
    pub checkpoint: Option<PathBuf>,
    /// Score the samples of a `did sample --out` file instead of sampling.
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// The judge: a causal checkpoint (`did train --objective ar`, `did import gpt2`) with the same tokenizer.
    #[arg(long)]
    pub judge: PathBuf,
    /// What and how to sample (as `did sample`).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Regenerate a sample whose last 256 tokens have a unigram entropy below this many nats
    /// (BD3-LM: 4 on GPT-2 tokens; default 4 for gpt2 models, 1.5 for bytes; 0 never).
    #[arg(long)]
    pub regen_threshold: Option<f64>,
    /// Regenerations per sample before giving up.
    #[arg(long, default_value_t = 10)]
    pub max_tries: u32,
    /// Also score the samples' text with a CMU Sphinx n-gram model, the independent judge
    /// (`scripts/fetch-judges.sh` fetches PocketSphinx's en-us trigram model): per-word perplexity and OOV rate.
    #[arg(long)]
    pub word_judge: Option<PathBuf>,
    /// Also write the figures (and per-sample values) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `did eval gen-ppl`: samples (or reads samples), regenerates degenerate ones, scores them; the
/// tables, and the JSON where asked.
pub fn gen_ppl<B: Backend>(be: &B, opts: &GenPplOptions) -> Result<String, String> {
    let source = match (&opts.checkpoint, &opts.samples) {
        (Some(ckpt), None) => SampleSource::Checkpoint(ckpt.clone()),
        (None, Some(file)) => SampleSource::File(file.clone()),
        _ => return Err("give either --checkpoint (to sample) or --samples FILE.jsonl (to score `did sample --out`)".into()),
    };
    let report = did_engine::eval::gen_ppl::gen_ppl(
        be,
        &GenPplSettings {
            source,
            judge: opts.judge.clone(),
            sampling: (&opts.sampling).into(),
            regen_threshold: opts.regen_threshold,
            max_tries: opts.max_tries,
            word_judge: opts.word_judge.clone(),
        },
    )?;
    write_json(&opts.json, &report)?;
    Ok(report.markdown())
}

/// `did eval entropy FILE.jsonl`: the unigram entropy of each sample of a `did sample --out`
/// file, and their mean.
pub fn entropy(path: &Path, json: &Option<PathBuf>) -> Result<String, String> {
    let report = EntropyReport::of_file(path)?;
    write_json(json, &report)?;
    Ok(report.markdown())
}

/// `did eval word-ppl FILE.jsonl --lm en-us.lm.bin`: per-word perplexity of each sample's text
/// under a CMU Sphinx trie n-gram model (the second, independent judge), with the OOV rate and
/// the samples' entropy.
pub fn word_ppl(path: &Path, lm_path: &Path, json: &Option<PathBuf>) -> Result<String, String> {
    let report = WordPplReport::of_file(path, lm_path)?;
    write_json(json, &report)?;
    Ok(report.markdown())
}
