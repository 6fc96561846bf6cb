//! The perplexity bound of a held-out split (BD3-LM's evaluation, docs/bd3lm.md §5):
//! consecutive windows of the split, one diffusion time per (sequence, block) from the antithetic
//! stratified sampler over the unclipped linear schedule `t ∈ [1e-3, 1]`, position 0 of each
//! window never masked and not counted. A causal model gets its exact next-token perplexity.

use std::path::PathBuf;
use std::time::Instant;

use did_core::backend::Backend;
use did_core::model::{causal_batch, diffusion_batch, Activations, Architecture, Transformer};
use did_core::schedule::TrainingSchedule;

use crate::checkpoint;
use crate::data::shard::Shard;
use crate::Error;

/// What to evaluate (`did eval nelbo`'s flags).
#[derive(Debug, Clone, PartialEq)]
pub struct NelboSettings {
    /// A checkpoint (diffusion, or causal for its exact perplexity).
    pub checkpoint: PathBuf,
    /// Folder with valid.bin and test.bin (from `did data prepare`).
    pub data: PathBuf,
    /// valid or test.
    pub split: String,
    /// Block size of the bound (required for diffusion models).
    pub block: Option<usize>,
    /// Sequence length (default: the model's context).
    pub length: Option<usize>,
    /// Sequences per forward pass.
    pub batch: usize,
    /// Evaluate at most this many sequences (default: the whole split).
    pub max_sequences: Option<usize>,
    /// Seed of the diffusion times and masks.
    pub seed: u64,
    /// Use the trained weights instead of the EMA weights.
    pub no_ema: bool,
}

/// The bound, as `did eval nelbo --json` writes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NelboReport {
    /// Always `nelbo`.
    pub metric: &'static str,
    /// The checkpoint.
    pub checkpoint: String,
    /// valid or test.
    pub split: String,
    /// `Dit` or `Gpt2`.
    pub architecture: String,
    /// The bound's block size (1 for a causal model).
    pub block_size: usize,
    /// Window length.
    pub length: usize,
    /// Windows evaluated.
    pub sequences: usize,
    /// Tokens counted (position 0 of each window is not).
    pub tokens: usize,
    /// The bound on the negative log-likelihood per token (nats).
    pub nll_per_token: f64,
    /// exp(nll_per_token).
    pub perplexity: f64,
    /// How the diffusion times were drawn.
    pub schedule: &'static str,
    /// Seed of the times and masks.
    pub seed: u64,
    /// Whether the EMA weights were evaluated.
    pub ema: bool,
    /// Wall time.
    pub seconds: f64,
}

impl NelboReport {
    /// One markdown table row under its header.
    pub fn markdown(&self) -> String {
        let kind = match self.architecture.as_str() {
            "Gpt2" => "exact (causal)".to_string(),
            _ => format!("NELBO bound, block {}", self.block_size),
        };
        format!(
            "| checkpoint | split | likelihood | length | sequences | tokens | NLL / token | perplexity | seconds |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|\n\
             | {} | {} | {kind} | {} | {} | {} | {:.4} | {:.2} | {:.1} |\n",
            self.checkpoint,
            self.split,
            self.length,
            self.sequences,
            self.tokens,
            self.nll_per_token,
            self.perplexity,
            self.seconds
        )
    }
}

/// Evaluates the bound on `be`.
pub fn nelbo<B: Backend>(be: &B, s: &NelboSettings) -> Result<NelboReport, Error> {
    let bad = Error::Eval;
    let ckpt = checkpoint::load(&s.checkpoint)?;
    let config = ckpt.config;
    let path = match s.split.as_str() {
        "valid" | "test" => s.data.join(format!("{}.bin", s.split)),
        other => return Err(bad(format!("unknown --split {other:?}; use valid or test"))),
    };
    let shard = Shard::open(&path)?;
    if shard.header().vocab_size as usize != config.vocab_size {
        return Err(bad(format!(
            "{} holds {} tokens (vocabulary {}) but the model's vocabulary is {}; prepare the data with the model's tokenizer",
            path.display(),
            shard.header().tokenizer,
            shard.header().vocab_size,
            config.vocab_size
        )));
    }
    let len = s.length.unwrap_or(config.context);
    if len < 2 || len > config.context {
        return Err(bad(format!(
            "--length {len} must be in 2..={} (the model's context)",
            config.context
        )));
    }
    let block = match (config.architecture, s.block) {
        (Architecture::Gpt2, Some(_)) => {
            return Err(bad("--block is for diffusion models; a causal checkpoint has an exact likelihood".into()))
        }
        (Architecture::Gpt2, None) => 1,
        (Architecture::Dit, Some(b)) if b >= 1 && len % b == 0 => b,
        (Architecture::Dit, Some(b)) => return Err(bad(format!("--block {b} must divide the length {len}"))),
        (Architecture::Dit, None) => {
            return Err(bad(format!(
                "name the block size of the bound with --block (4 for a BD3 model trained at 4, {len} for MDLM's): the NELBO depends on it"
            )))
        }
    };
    if s.batch == 0 {
        return Err(bad("--batch must be at least 1".into()));
    }
    let available = shard.len() / len;
    let sequences = s.max_sequences.map_or(available, |m| m.min(available));
    if sequences == 0 {
        return Err(bad(format!(
            "{} has {} tokens, fewer than one sequence of {len}; use a longer split or a shorter --length",
            path.display(),
            shard.len()
        )));
    }
    let backend = |e: did_core::Error| bad(e.to_string());
    let model = Transformer::new(config).map_err(|e| bad(e.to_string()))?;
    let weights = if s.no_ema {
        &ckpt.params
    } else {
        ckpt.ema.as_ref().unwrap_or(&ckpt.params)
    };
    let params = be.upload(weights).map_err(|e| bad(e.to_string()))?;
    let started = Instant::now();
    let schedule = TrainingSchedule::default();
    let (mut nll, mut counted) = (0.0f64, 0usize);
    let mut acts: Option<Activations<B>> = None;
    let (mut done, mut step) = (0, 0u32);
    while done < sequences {
        let b = s.batch.min(sequences - done);
        let mut x = vec![0u32; b * len];
        for (k, w) in x.chunks_mut(len).enumerate() {
            shard.read((done + k) * len, w);
        }
        let tb = match config.architecture {
            Architecture::Dit => {
                diffusion_batch(&x, b, len, block, &schedule, config.mask_id, s.seed, step)
            }
            Architecture::Gpt2 => causal_batch(&x, b, len),
        }
        .map_err(backend)?;
        if acts.as_ref().is_none_or(|a| a.batch != b) {
            drop(acts.take()); // free before allocating another shape
            acts =
                Some(Activations::for_training(be, &config, &tb).map_err(|e| bad(e.to_string()))?);
        }
        let a = acts.as_mut().ok_or_else(|| bad("no activations".into()))?;
        model
            .load_batch(be, a, &tb)
            .map_err(|e| bad(e.to_string()))?;
        let loss = model
            .loss(be, &params, a, None)
            .map_err(|e| bad(e.to_string()))?;
        // Undo the per-batch normalisation of the weights (did-core's model pass): NLL sums.
        nll += match config.architecture {
            Architecture::Dit => loss * (b * len) as f64,
            Architecture::Gpt2 => loss * (b * (len - 1)) as f64,
        };
        counted += b * (len - 1);
        done += b;
        step += 1;
    }
    let per_token = nll / counted as f64;
    Ok(NelboReport {
        metric: "nelbo",
        checkpoint: s.checkpoint.display().to_string(),
        split: s.split.clone(),
        architecture: format!("{:?}", config.architecture),
        block_size: block,
        length: len,
        sequences,
        tokens: counted,
        nll_per_token: per_token,
        perplexity: per_token.exp(),
        schedule: "linear, t in [1e-3, 1], unclipped, antithetic stratified, one draw per (sequence, block)",
        seed: s.seed,
        ema: !s.no_ema && ckpt.ema.is_some(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
