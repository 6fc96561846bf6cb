//! `did eval`: the NELBO perplexity of a held-out split, the generative
//! perplexity of samples under a causal judge (BD3-LM's protocol, docs/bd3lm.md
//! §5), and the entropy of samples. Each prints a markdown table and can
//! write the same figures as JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use did_core::backend::Backend;
use did_core::model::{causal_batch, diffusion_batch, Activations, Architecture, Transformer};
use did_core::sample::stop::unigram_entropy;
use did_core::schedule::TrainingSchedule;
use did_engine::judge::{JudgeModel, JudgeScore};
use did_engine::samples::{parse_samples, SampleRecord};

use crate::checkpoint;
use crate::data::shard::Shard;
use crate::data::tokenizer::TokenizerKind;
use crate::sample::{self, SamplingArgs};

/// Where a result goes besides stdout.
fn write_json(path: &Option<PathBuf>, value: &serde_json::Value) -> Result<(), String> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
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

/// The perplexity bound of a held-out split: consecutive windows of the split,
/// one diffusion time per (sequence, block) from the antithetic stratified
/// sampler over the unclipped linear schedule `t ∈ [1e-3, 1]` (BD3-LM's
/// evaluation), position 0 of each window never masked and not counted. A
/// causal model gets its exact next-token perplexity.
pub fn nelbo<B: Backend>(be: &B, opts: &NelboOptions) -> Result<String, String> {
    let ckpt = checkpoint::load(&opts.checkpoint)?;
    let config = ckpt.config;
    let path = match opts.split.as_str() {
        "valid" | "test" => opts.data.join(format!("{}.bin", opts.split)),
        other => return Err(format!("unknown --split {other:?}; use valid or test")),
    };
    let shard = Shard::open(&path)?;
    if shard.header().vocab_size as usize != config.vocab_size {
        return Err(format!(
            "{} holds {} tokens (vocabulary {}) but the model's vocabulary is {}; prepare the data with the model's tokenizer",
            path.display(),
            shard.header().tokenizer,
            shard.header().vocab_size,
            config.vocab_size
        ));
    }
    let len = opts.length.unwrap_or(config.context);
    if len < 2 || len > config.context {
        return Err(format!(
            "--length {len} must be in 2..={} (the model's context)",
            config.context
        ));
    }
    let block = match (config.architecture, opts.block) {
        (Architecture::Gpt2, Some(_)) => {
            return Err("--block is for diffusion models; a causal checkpoint has an exact likelihood".into())
        }
        (Architecture::Gpt2, None) => 1,
        (Architecture::Dit, Some(b)) if b >= 1 && len % b == 0 => b,
        (Architecture::Dit, Some(b)) => return Err(format!("--block {b} must divide the length {len}")),
        (Architecture::Dit, None) => {
            return Err(format!(
                "name the block size of the bound with --block (4 for a BD3 model trained at 4, {len} for MDLM's): the NELBO depends on it"
            ))
        }
    };
    if opts.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    let available = shard.len() / len;
    let sequences = opts.max_sequences.map_or(available, |m| m.min(available));
    if sequences == 0 {
        return Err(format!(
            "{} has {} tokens, fewer than one sequence of {len}; use a longer split or a shorter --length",
            path.display(),
            shard.len()
        ));
    }
    let model = Transformer::new(config).map_err(|e| e.to_string())?;
    let weights = if opts.no_ema {
        &ckpt.params
    } else {
        ckpt.ema.as_ref().unwrap_or(&ckpt.params)
    };
    let params = be.upload(weights).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let schedule = TrainingSchedule::default();
    let (mut nll, mut counted) = (0.0f64, 0usize);
    let mut acts: Option<Activations<B>> = None;
    let mut done = 0;
    let mut step = 0u32;
    while done < sequences {
        let b = opts.batch.min(sequences - done);
        let mut x = vec![0u32; b * len];
        for (k, w) in x.chunks_mut(len).enumerate() {
            shard.read((done + k) * len, w);
        }
        let tb = match config.architecture {
            Architecture::Dit => diffusion_batch(
                &x,
                b,
                len,
                block,
                &schedule,
                config.mask_id,
                opts.seed,
                step,
            ),
            Architecture::Gpt2 => causal_batch(&x, b, len),
        }
        .map_err(|e| e.to_string())?;
        if acts.as_ref().is_none_or(|a| a.batch != b) {
            drop(acts.take()); // free before allocating another shape
            acts = Some(Activations::for_training(be, &config, &tb).map_err(|e| e.to_string())?);
        }
        let a = acts.as_mut().ok_or("activations")?;
        model.load_batch(be, a, &tb).map_err(|e| e.to_string())?;
        let loss = model
            .loss(be, &params, a, None)
            .map_err(|e| e.to_string())?;
        // Undo the per-batch normalisation of the weights (pass.rs): NLL sums.
        nll += match config.architecture {
            Architecture::Dit => loss * (b * len) as f64,
            Architecture::Gpt2 => loss * (b * (len - 1)) as f64,
        };
        counted += b * (len - 1);
        done += b;
        step += 1;
    }
    let per_token = nll / counted as f64;
    let seconds = started.elapsed().as_secs_f64();
    let kind = match config.architecture {
        Architecture::Dit => format!("NELBO bound, block {block}"),
        Architecture::Gpt2 => "exact (causal)".to_string(),
    };
    write_json(
        &opts.json,
        &serde_json::json!({
            "metric": "nelbo",
            "checkpoint": opts.checkpoint.display().to_string(),
            "split": opts.split,
            "architecture": format!("{:?}", config.architecture),
            "block_size": block,
            "length": len,
            "sequences": sequences,
            "tokens": counted,
            "nll_per_token": per_token,
            "perplexity": per_token.exp(),
            "schedule": "linear, t in [1e-3, 1], unclipped, antithetic stratified, one draw per (sequence, block)",
            "seed": opts.seed,
            "ema": !opts.no_ema && ckpt.ema.is_some(),
            "seconds": seconds,
        }),
    )?;
    Ok(format!(
        "| checkpoint | split | likelihood | length | sequences | tokens | NLL / token | perplexity | seconds |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {kind} | {len} | {sequences} | {counted} | {per_token:.4} | {:.2} | {seconds:.1} |\n",
        opts.checkpoint.display(),
        opts.split,
        per_token.exp()
    ))
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

/// BD3-LM's threshold is on GPT-2 tokens; fluent byte-level text has a unigram
/// entropy of only ≈ 2.5–3 nats, so bytes get a threshold that still catches
/// repetition loops (which score below 1.5).
pub fn default_regen_threshold(kind: TokenizerKind) -> f64 {
    match kind {
        TokenizerKind::Gpt2 => 4.0,
        TokenizerKind::Bytes => 1.5,
    }
}

/// Samples (or reads samples), regenerates degenerate ones, and scores every
/// sample with the judge.
pub fn gen_ppl<B: Backend>(be: &B, opts: &GenPplOptions) -> Result<String, String> {
    let judge_model = JudgeModel::load(&opts.judge)?;
    let word_judge = opts.word_judge.as_deref().map(load_ngram).transpose()?;
    let judge_params = judge_model.upload(be)?;
    let mut judge = judge_model.on(be, &judge_params)?;
    let threshold = opts
        .regen_threshold
        .unwrap_or_else(|| default_regen_threshold(judge.tokenizer()));
    let started = Instant::now();
    let (source, samples, regenerated) = match (&opts.checkpoint, &opts.samples) {
        (Some(ckpt), None) => {
            let prep = sample::Prepared::load(ckpt, &opts.sampling)?;
            if prep.model.config().vocab_size != judge_model.vocab() {
                return Err(format!(
                    "the judge's vocabulary ({}) is not the model's ({}); train the judge on the same tokenizer",
                    judge_model.vocab(),
                    prep.model.config().vocab_size
                ));
            }
            let params = prep.upload(be)?;
            let n = opts.sampling.num_samples;
            let mut out: Vec<SampleRecord> = Vec::with_capacity(n);
            let mut regenerated = 0;
            let mut done = 0;
            while done < n {
                let b = opts.sampling.batch.min(n - done);
                let batch = prep.draw(be, &params, done as u32, b)?;
                for s in batch {
                    out.push(s.into());
                }
                done += b;
            }
            // Regenerate degenerate samples one by one, with sample ids past the batch's.
            for (i, s) in out.iter_mut().enumerate() {
                let mut tries = 0;
                while threshold > 0.0 && tail_entropy(&s.tokens) < threshold {
                    if tries == opts.max_tries {
                        return Err(format!(
                            "sample {i} stayed degenerate (entropy of its last 256 tokens below {threshold}) after {} regenerations; lower --regen-threshold (0 turns regeneration off)",
                            opts.max_tries
                        ));
                    }
                    tries += 1;
                    regenerated += 1;
                    let id = (n as u32).saturating_mul(tries).saturating_add(i as u32);
                    let again = prep.draw(be, &params, id, 1)?;
                    *s = again.into_iter().next().ok_or("no sample")?.into();
                }
            }
            (ckpt.display().to_string(), out, regenerated)
        }
        (None, Some(file)) => (file.display().to_string(), read_samples(file)?, 0),
        _ => return Err("give either --checkpoint (to sample) or --samples FILE.jsonl (to score `did sample --out`)".into()),
    };
    if let Some((i, bad)) = samples.iter().enumerate().find_map(|(i, s)| {
        s.tokens
            .iter()
            .find(|&&t| t as usize >= judge.vocab())
            .map(|&t| (i, t))
    }) {
        return Err(format!(
            "sample {i} holds token {bad}, outside the judge's vocabulary of {}",
            judge.vocab()
        ));
    }
    let mut scores = Vec::with_capacity(samples.len());
    for s in &samples {
        scores.push(judge.score(&s.tokens)?);
    }
    let n = scores.len().max(1) as f64;
    let mean_ppl = scores.iter().map(JudgeScore::perplexity).sum::<f64>() / n;
    let (nll, targets) = scores
        .iter()
        .fold((0.0, 0), |(a, b), s| (a + s.nll, b + s.targets));
    let token_ppl = (nll / targets.max(1) as f64).exp();
    let entropy = scores.iter().map(|s| s.entropy).sum::<f64>() / n;
    let nfe = samples.iter().map(|s| f64::from(s.nfe)).sum::<f64>() / n;
    let sample_seconds: f64 = samples.iter().map(|s| s.seconds).sum();
    let words = word_judge.as_ref().map(|lm| {
        let decoder = crate::data::tokenizer::Tokenizer::new(judge.tokenizer());
        WordJudgement::of(
            lm,
            samples
                .iter()
                .map(|s| s.text.clone().unwrap_or_else(|| decoder.decode(&s.tokens))),
        )
    });
    let seconds = started.elapsed().as_secs_f64();
    write_json(
        &opts.json,
        &serde_json::json!({
            "metric": "gen-ppl",
            "source": source,
            "judge": judge_model.path.display().to_string(),
            "samples": samples.len(),
            "stages": opts.checkpoint.as_ref().map(|_| opts.sampling.stages.clone()),
            "remask": opts.checkpoint.as_ref().map(|_| opts.sampling.remask.clone()),
            "seed": opts.sampling.seed,
            "gen_ppl_mean_per_sample": mean_ppl,
            "gen_ppl_token_weighted": token_ppl,
            "entropy": entropy,
            "nfe_mean": nfe,
            "samples_per_s": if sample_seconds > 0.0 { samples.len() as f64 / sample_seconds } else { 0.0 },
            "regenerated": regenerated,
            "regen_threshold": threshold,
            "per_sample": scores.iter().zip(&samples).map(|(s, x)| serde_json::json!({
                "ppl": s.perplexity(), "entropy": s.entropy, "targets": s.targets, "nfe": x.nfe,
                "seconds": x.seconds,
                "text": x.text.clone().unwrap_or_else(|| crate::data::tokenizer::Tokenizer::new(judge.tokenizer()).decode(x.tokens.get(1..).unwrap_or(&[]))),
            })).collect::<Vec<_>>(),
            "word_judge": words.as_ref().map(|w| w.json(opts.word_judge.as_deref())),
            "seconds": seconds,
        }),
    )?;
    let word_table = words
        .as_ref()
        .map_or(String::new(), |w| w.table(opts.word_judge.as_deref()));
    Ok(format!(
        "| source | judge | samples | gen PPL (mean of per-sample) | gen PPL (token-weighted) | entropy (nats) | NFE | samples/s | regenerated |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n\
         | {source} | {} | {} | {mean_ppl:.2} | {token_ppl:.2} | {entropy:.3} | {nfe:.1} | {} | {regenerated} |\n\n\
         BD3-LM's protocol: retokenised, windows of the judge's context with stride context/2, end-of-text targets excluded; \
         the paper's tables report the mean of per-sample perplexities. Regeneration threshold {threshold} nats on the last 256 tokens.\n{word_table}",
        judge_model.path.display(),
        samples.len(),
        if sample_seconds > 0.0 { format!("{:.3}", samples.len() as f64 / sample_seconds) } else { "–".into() },
    ))
}

impl From<sample::Drawn> for SampleRecord {
    fn from(d: sample::Drawn) -> Self {
        SampleRecord {
            tokens: d.tokens,
            nfe: d.nfe,
            seconds: d.seconds,
            text: None,
        }
    }
}

/// Unigram entropy of the last 256 tokens (BD3-LM's degeneracy test).
fn tail_entropy(tokens: &[u32]) -> f64 {
    unigram_entropy(&tokens[tokens.len().saturating_sub(256)..])
}

/// The samples of a `did sample --out` file.
fn read_samples(path: &Path) -> Result<Vec<SampleRecord>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(parse_samples(&path.display().to_string(), &text)?)
}

// ---- entropy ----------------------------------------------------------------------------------------

/// `did eval entropy FILE.jsonl`: the unigram entropy of each sample of a
/// `did sample --out` file, and their mean.
pub fn entropy(path: &Path, json: &Option<PathBuf>) -> Result<String, String> {
    let samples = read_samples(path)?;
    let per: Vec<f64> = samples.iter().map(|s| unigram_entropy(&s.tokens)).collect();
    let mean = per.iter().sum::<f64>() / per.len() as f64;
    let tail: Vec<f64> = samples.iter().map(|s| tail_entropy(&s.tokens)).collect();
    write_json(
        json,
        &serde_json::json!({
            "metric": "entropy",
            "source": path.display().to_string(),
            "samples": per.len(),
            "entropy_mean": mean,
            "per_sample": per,
            "last_256_entropy": tail,
        }),
    )?;
    Ok(format!(
        "| source | samples | entropy (nats, mean) | lowest | lowest over the last 256 tokens |\n|---|---:|---:|---:|---:|\n| {} | {} | {mean:.3} | {:.3} | {:.3} |\n",
        path.display(),
        per.len(),
        per.iter().copied().fold(f64::INFINITY, f64::min),
        tail.iter().copied().fold(f64::INFINITY, f64::min),
    ))
}

// ---- word perplexity under an n-gram model ---------------------------------------------------------

fn load_ngram(path: &Path) -> Result<crate::ngram_judge::NgramLm, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {}: {e}; fetch CMU's model with scripts/fetch-judges.sh",
            path.display()
        )
    })?;
    crate::ngram_judge::NgramLm::from_bytes(bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Texts scored by the independent judge: pooled and per sample.
struct WordJudgement {
    total: crate::ngram_judge::WordScore,
    per: Vec<crate::ngram_judge::WordScore>,
    /// What an OOV word is charged in the OOV-charged perplexity.
    oov_ln_prob: f64,
}

impl WordJudgement {
    fn of(lm: &crate::ngram_judge::NgramLm, texts: impl Iterator<Item = String>) -> Self {
        let mut total = crate::ngram_judge::WordScore::default();
        let per: Vec<_> = texts
            .map(|t| {
                let s = lm.score_sentence(&crate::ngram_judge::words(&t));
                total.add(s);
                s
            })
            .collect();
        Self {
            total,
            per,
            oov_ln_prob: lm.rarest_ln_prob(),
        }
    }

    fn mean_ppl(&self) -> f64 {
        self.per.iter().map(|s| s.perplexity()).sum::<f64>() / self.per.len().max(1) as f64
    }

    fn json(&self, lm: Option<&Path>) -> serde_json::Value {
        serde_json::json!({
            "judge": lm.map(|p| p.display().to_string()),
            "words_scored": self.total.scored,
            "oov": self.total.oov,
            "oov_rate": self.total.oov_rate(),
            "word_ppl_pooled": self.total.perplexity(),
            "word_ppl_mean_of_samples": self.mean_ppl(),
            "word_ppl_oov_charged": self.total.perplexity_charging_oov(self.oov_ln_prob),
            "oov_charge_ln_prob": self.oov_ln_prob,
            "per_sample_word_ppl": self.per.iter().map(|s| s.perplexity()).collect::<Vec<_>>(),
        })
    }

    fn table(&self, lm: Option<&Path>) -> String {
        format!(
            "\n| word judge | words scored | OOV | word perplexity (pooled, OOV skipped) | mean of per-sample | OOV charged as the rarest word |\n|---|---:|---:|---:|---:|---:|\n| {} | {} | {:.2} % | {:.1} | {:.1} | {:.1} |\n",
            lm.map_or(String::new(), |p| p.display().to_string()),
            self.total.scored,
            100.0 * self.total.oov_rate(),
            self.total.perplexity(),
            self.mean_ppl(),
            self.total.perplexity_charging_oov(self.oov_ln_prob),
        )
    }
}

/// `did eval word-ppl FILE.jsonl --lm en-us.lm.bin`: per-word perplexity of
/// each sample's text under a CMU Sphinx trie n-gram model (the second,
/// independent judge), with the OOV rate and the samples' entropy.
pub fn word_ppl(path: &Path, lm_path: &Path, json: &Option<PathBuf>) -> Result<String, String> {
    let samples = read_samples(path)?;
    let lm = load_ngram(lm_path)?;
    let mut texts = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        texts.push(s.text.clone().ok_or_else(|| {
            format!(
                "{} line {}: no \"text\"; word perplexity needs the decoded text `did sample --out` writes",
                path.display(),
                i + 1
            )
        })?);
    }
    let w = WordJudgement::of(&lm, texts.into_iter());
    let entropy = samples
        .iter()
        .map(|s| unigram_entropy(&s.tokens))
        .sum::<f64>()
        / samples.len() as f64;
    let mut report = w.json(Some(lm_path));
    report["metric"] = "word_ppl".into();
    report["judge_order"] = lm.order().into();
    report["source"] = path.display().to_string().into();
    report["samples"] = samples.len().into();
    report["entropy_mean"] = entropy.into();
    write_json(json, &report)?;
    Ok(format!(
        "| source | samples | words scored | OOV | word perplexity (pooled, OOV skipped) | mean of per-sample | OOV charged as the rarest word | entropy (nats, tokens) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {:.2} % | {:.1} | {:.1} | {:.1} | {entropy:.3} |\n",
        path.display(),
        samples.len(),
        w.total.scored,
        100.0 * w.total.oov_rate(),
        w.total.perplexity(),
        w.mean_ppl(),
        w.total.perplexity_charging_oov(w.oov_ln_prob),
    ))
}
