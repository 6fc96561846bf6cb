//! Generative perplexity (BD3-LM's protocol, docs/bd3lm.md §5): samples drawn from a checkpoint
//! (or read from a `did sample --out` file), degenerate ones regenerated as BD3-LM does, each
//! scored by a causal judge, and optionally every text by the word judge ([`super::word`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use did_core::backend::Backend;

use super::word::{load_ngram, WordJudgement};
use super::{read_samples, tail_entropy};
use crate::data::tokenizer::{Tokenizer, TokenizerKind};
use crate::judge::{JudgeModel, JudgeScore};
use crate::samples::SampleRecord;
use crate::sampling::{Drawn, Prepared, SamplingSettings};
use crate::Error;

/// Where the samples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SampleSource {
    /// Drawn from this checkpoint with the settings.
    Checkpoint(PathBuf),
    /// Read from this `did sample --out` file.
    File(PathBuf),
}

/// What to score and how (`did eval gen-ppl`'s flags).
#[derive(Debug, Clone, PartialEq)]
pub struct GenPplSettings {
    /// Where the samples come from.
    pub source: SampleSource,
    /// The causal judge's checkpoint (same tokenizer as the samples).
    pub judge: PathBuf,
    /// How to sample, for [`SampleSource::Checkpoint`].
    pub sampling: SamplingSettings,
    /// Regenerate a sample whose last 256 tokens have a unigram entropy below this many nats
    /// (default: [`default_regen_threshold`] of the judge's tokenizer; 0 never).
    pub regen_threshold: Option<f64>,
    /// Regenerations per sample before giving up.
    pub max_tries: u32,
    /// The word judge's n-gram model, if any.
    pub word_judge: Option<PathBuf>,
}

/// BD3-LM's threshold is on GPT-2 tokens; fluent byte-level text has a unigram entropy of only
/// ≈ 2.5–3 nats, so bytes get a threshold that still catches repetition loops (which score
/// below 1.5).
///
/// ```
/// use did_engine::data::tokenizer::TokenizerKind;
/// assert_eq!(did_engine::eval::gen_ppl::default_regen_threshold(TokenizerKind::Gpt2), 4.0);
/// ```
pub fn default_regen_threshold(kind: TokenizerKind) -> f64 {
    match kind {
        TokenizerKind::Gpt2 => 4.0,
        TokenizerKind::Bytes => 1.5,
    }
}

/// One sample's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleScore {
    /// Its perplexity under the causal judge.
    pub ppl: f64,
    /// Its unigram entropy (nats).
    pub entropy: f64,
    /// Tokens the judge scored.
    pub targets: usize,
    /// Its denoiser calls.
    pub nfe: u32,
    /// Its share of its batch's wall time.
    pub seconds: f64,
    /// Its text.
    pub text: String,
}

/// The scores, as `did eval gen-ppl --json` writes them (what `did-report` reads).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenPplReport {
    /// Always `gen-ppl`.
    pub metric: &'static str,
    /// The checkpoint or file the samples came from.
    pub source: String,
    /// The judge's checkpoint.
    pub judge: String,
    /// How many samples.
    pub samples: usize,
    /// The stage plan (drawn samples only).
    pub stages: Option<String>,
    /// The remask strategy (drawn samples only).
    pub remask: Option<String>,
    /// The sampling seed.
    pub seed: u64,
    /// The mean of per-sample perplexities (the paper's tables).
    pub gen_ppl_mean_per_sample: f64,
    /// exp of the mean NLL over every scored token.
    pub gen_ppl_token_weighted: f64,
    /// The samples' mean unigram entropy (nats).
    pub entropy: f64,
    /// The samples' mean NFE.
    pub nfe_mean: f64,
    /// Samples per second of sampling (0 when read from a file).
    pub samples_per_s: f64,
    /// Degenerate samples drawn again.
    pub regenerated: u32,
    /// The entropy below which a sample was regenerated.
    pub regen_threshold: f64,
    /// Each sample's figures.
    pub per_sample: Vec<SampleScore>,
    /// The word judge's scores, if asked for.
    pub word_judge: Option<WordJudgement>,
    /// Wall time, sampling and scoring.
    pub seconds: f64,
}

impl GenPplReport {
    /// The markdown tables `did eval gen-ppl` prints.
    pub fn markdown(&self) -> String {
        let rate = if self.samples_per_s > 0.0 {
            format!("{:.3}", self.samples_per_s)
        } else {
            "–".into()
        };
        format!(
            "| source | judge | samples | gen PPL (mean of per-sample) | gen PPL (token-weighted) | entropy (nats) | NFE | samples/s | regenerated |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|\n\
             | {} | {} | {} | {:.2} | {:.2} | {:.3} | {:.1} | {rate} | {} |\n\n\
             BD3-LM's protocol: retokenised, windows of the judge's context with stride context/2, end-of-text targets excluded; \
             the paper's tables report the mean of per-sample perplexities. Regeneration threshold {} nats on the last 256 tokens.\n{}",
            self.source,
            self.judge,
            self.samples,
            self.gen_ppl_mean_per_sample,
            self.gen_ppl_token_weighted,
            self.entropy,
            self.nfe_mean,
            self.regenerated,
            self.regen_threshold,
            self.word_judge.as_ref().map_or(String::new(), WordJudgement::markdown),
        )
    }
}

impl From<Drawn> for SampleRecord {
    fn from(d: Drawn) -> Self {
        SampleRecord {
            tokens: d.tokens,
            nfe: d.nfe,
            seconds: d.seconds,
            text: None,
        }
    }
}

/// Samples (or reads samples), regenerates degenerate ones, and scores every sample.
pub fn gen_ppl<B: Backend>(be: &B, s: &GenPplSettings) -> Result<GenPplReport, Error> {
    let judge_model = JudgeModel::load(&s.judge)?;
    let word_lm = s.word_judge.as_deref().map(load_ngram).transpose()?;
    let judge_params = judge_model.upload(be)?;
    let mut judge = judge_model.on(be, &judge_params)?;
    let threshold = s
        .regen_threshold
        .unwrap_or_else(|| default_regen_threshold(judge.tokenizer()));
    let started = Instant::now();
    let (source, samples, regenerated) = match &s.source {
        SampleSource::Checkpoint(ckpt) => {
            let (samples, regenerated) =
                draw_scorable(be, ckpt, s, judge_model.vocab(), threshold)?;
            (ckpt.display().to_string(), samples, regenerated)
        }
        SampleSource::File(file) => (file.display().to_string(), read_samples(file)?, 0),
    };
    if let Some((i, bad)) = samples.iter().enumerate().find_map(|(i, x)| {
        x.tokens
            .iter()
            .find(|&&t| t as usize >= judge.vocab())
            .map(|&t| (i, t))
    }) {
        return Err(Error::Eval(format!(
            "sample {i} holds token {bad}, outside the judge's vocabulary of {}",
            judge.vocab()
        )));
    }
    let mut scores = Vec::with_capacity(samples.len());
    for x in &samples {
        scores.push(judge.score(&x.tokens)?);
    }
    let decoder = Tokenizer::new(judge.tokenizer());
    let text_of = |x: &SampleRecord| sample_text(&decoder, x);
    let n = scores.len().max(1) as f64;
    let (nll, targets) = scores
        .iter()
        .fold((0.0, 0), |(a, b), x| (a + x.nll, b + x.targets));
    let sample_seconds: f64 = samples.iter().map(|x| x.seconds).sum();
    let drawn = matches!(s.source, SampleSource::Checkpoint(_));
    Ok(GenPplReport {
        metric: "gen-ppl",
        source,
        judge: judge_model.path.display().to_string(),
        samples: samples.len(),
        stages: drawn.then(|| s.sampling.stages.clone()),
        remask: drawn.then(|| s.sampling.remask.clone()),
        seed: s.sampling.seed,
        gen_ppl_mean_per_sample: scores.iter().map(JudgeScore::perplexity).sum::<f64>() / n,
        gen_ppl_token_weighted: (nll / targets.max(1) as f64).exp(),
        entropy: scores.iter().map(|x| x.entropy).sum::<f64>() / n,
        nfe_mean: samples.iter().map(|x| f64::from(x.nfe)).sum::<f64>() / n,
        samples_per_s: if sample_seconds > 0.0 {
            samples.len() as f64 / sample_seconds
        } else {
            0.0
        },
        regenerated,
        regen_threshold: threshold,
        per_sample: scores
            .iter()
            .zip(&samples)
            .map(|(sc, x)| SampleScore {
                ppl: sc.perplexity(),
                entropy: sc.entropy,
                targets: sc.targets,
                nfe: x.nfe,
                seconds: x.seconds,
                text: text_of(x),
            })
            .collect(),
        word_judge: word_lm
            .as_ref()
            .map(|lm| WordJudgement::of(lm, s.word_judge.as_deref(), samples.iter().map(text_of))),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A sample's text: the file's, or its tokens decoded after the BOS every sample starts with (the
/// judges score the text, and `<|endoftext|>` is not a word of it).
///
/// ```
/// use did_engine::data::tokenizer::{Tokenizer, TokenizerKind};
/// use did_engine::samples::SampleRecord;
/// let bytes = Tokenizer::new(TokenizerKind::Bytes);
/// let mut tokens = vec![TokenizerKind::Bytes.eos()];
/// tokens.extend(bytes.encode("hello"));
/// let x = SampleRecord { tokens, nfe: 5, seconds: 0.0, text: None };
/// assert_eq!(did_engine::eval::gen_ppl::sample_text(&bytes, &x), "hello");
/// ```
pub fn sample_text(decoder: &Tokenizer, x: &SampleRecord) -> String {
    x.text
        .clone()
        .unwrap_or_else(|| decoder.decode(x.tokens.get(1..).unwrap_or(&[])))
}

/// Draws the samples in batches, then regenerates each degenerate one alone, with sample ids
/// past the batch's; returns them with the number of regenerations.
fn draw_scorable<B: Backend>(
    be: &B,
    ckpt: &Path,
    s: &GenPplSettings,
    judge_vocab: usize,
    threshold: f64,
) -> Result<(Vec<SampleRecord>, u32), Error> {
    let prep = Prepared::load(ckpt, &s.sampling)?;
    if prep.model.config().vocab_size != judge_vocab {
        return Err(Error::Eval(format!(
            "the judge's vocabulary ({judge_vocab}) is not the model's ({}); train the judge on the same tokenizer",
            prep.model.config().vocab_size
        )));
    }
    let params = prep.upload(be)?;
    let n = s.sampling.num_samples;
    let mut out: Vec<SampleRecord> = Vec::with_capacity(n);
    while out.len() < n {
        let b = s.sampling.batch.min(n - out.len());
        out.extend(
            prep.draw(be, &params, out.len() as u32, b)?
                .into_iter()
                .map(SampleRecord::from),
        );
    }
    let mut regenerated = 0;
    for (i, x) in out.iter_mut().enumerate() {
        let mut tries = 0;
        while threshold > 0.0 && tail_entropy(&x.tokens) < threshold {
            if tries == s.max_tries {
                return Err(Error::Eval(format!(
                    "sample {i} stayed degenerate (entropy of its last 256 tokens below {threshold}) after {} regenerations; lower --regen-threshold (0 turns regeneration off)",
                    s.max_tries
                )));
            }
            tries += 1;
            regenerated += 1;
            let id = (n as u32).saturating_mul(tries).saturating_add(i as u32);
            let again = prep.draw(be, &params, id, 1)?;
            *x = again
                .into_iter()
                .next()
                .ok_or_else(|| Error::Eval("a regeneration returned no sample".into()))?
                .into();
        }
    }
    Ok((out, regenerated))
}
