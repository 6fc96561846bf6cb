//! Sampling from a checkpoint: the settings a caller gives (`did sample`'s flags, a run file, a
//! request), the checkpoint made ready to sample with them ([`Prepared`]), and each stage's wall
//! time ([`StageClock`]).
//!
//! The plan, update rules and remasking are did-core's (`did_core::refine`); this module resolves
//! the text forms a person writes into them, checks them against the checkpoint, and runs them
//! on a backend.

mod clock;

pub use clock::{ClockError, StageClock, StageTime};

use std::path::Path;
use std::time::Instant;

use did_core::backend::{Backend, UnknownWeightFormat, WeightFormat};
use did_core::model::{Architecture, CausalSampler, DiffusionDenoiser, Transformer};
use did_core::refine::{
    generate, GenerateConfig, GenerateError, Generation, RemaskScope, RemaskStrategy, StagePlan,
};
use did_core::sample::categorical::ConfidenceKind;
use did_core::sample::nucleus::{Nucleus, NucleusRule};
use did_core::sample::update::BlockUpdate;

use crate::checkpoint;
use crate::data::tokenizer::{tokenizer_for, Tokenizer};
use crate::Error;

/// What and how to sample, in the text forms a person writes: `did sample`'s flags, and what a
/// run file or a request may carry. The defaults are the paper's plan (`4,L:0.25`, snapshot
/// remasking, first-hitting, nucleus 0.9).
///
/// ```
/// let s: did_engine::sampling::SamplingSettings =
///     serde_json::from_str(r#"{"stages": "4@threshold:0.9,L:0.25", "seed": 7}"#).unwrap();
/// assert_eq!((s.stages.as_str(), s.seed, s.top_p), ("4@threshold:0.9,L:0.25", 7, 0.9));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingSettings {
    /// The stage plan (`did_core::refine::StagePlan`'s grammar): `4,L:0.25`, `4@threshold:0.9,…`.
    pub stages: String,
    /// How tokens are chosen for remasking: snapshot, snapshot-raw, snapshot-max, posthoc, random.
    pub remask: String,
    /// Where the remask fraction is counted: global (the sequence) or block (each draft block).
    pub scope: String,
    /// The update rule of stages that name none: first-hitting, ddpm:T, threshold:τ, entropy:β,
    /// topk:k.
    pub sampler: String,
    /// Nucleus (top-p) of every draw.
    pub top_p: f64,
    /// Seed of every random draw.
    pub seed: u64,
    /// Samples to draw.
    pub num_samples: usize,
    /// Samples per batch.
    pub batch: usize,
    /// Sequence length (default: the model's context).
    pub length: Option<usize>,
    /// Text every sample starts with (pinned: never remasked).
    pub prompt: Option<String>,
    /// End each sample at its first drawn end-of-text token.
    pub stop_at_eos: bool,
    /// Sample with the trained weights instead of the EMA weights.
    pub no_ema: bool,
    /// Allow a last stage smaller than the length (the small-refine-block ablation).
    pub local_final: bool,
    /// How the weight matrices are stored: f32, bf16 or int8 ([`WeightFormat`]).
    pub weights: String,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        SamplingSettings {
            stages: "4,L:0.25".into(),
            remask: "snapshot".into(),
            scope: "global".into(),
            sampler: "first-hitting".into(),
            top_p: 0.9,
            seed: 1,
            num_samples: 1,
            batch: 1,
            length: None,
            prompt: None,
            stop_at_eos: false,
            no_ema: false,
            local_final: false,
            weights: "f32".into(),
        }
    }
}

impl SamplingSettings {
    /// The generate settings these name for sequences of `len` tokens (`stages` in place of
    /// [`Self::stages`]: a causal model's one block), `eos` ending a sequence when
    /// [`Self::stop_at_eos`] is set. Errors name the setting and its allowed forms.
    pub fn generate_config(
        &self,
        stages: &str,
        len: usize,
        eos: u32,
    ) -> Result<GenerateConfig, Error> {
        let bad = Error::Sampling;
        let plan = stages
            .parse::<StagePlan>()
            .and_then(|p| p.resolve_with(len, !self.local_final))
            .map_err(|e| bad(format!("--stages: {e}")))?;
        let mut gen = GenerateConfig::new(plan, self.seed);
        gen.remask = remask_strategy(&self.remask)?;
        gen.scope = match self.scope.as_str() {
            "global" => RemaskScope::Global,
            "block" => RemaskScope::PerBlock,
            other => {
                return Err(bad(format!(
                    "unknown --scope {other:?}; use global or block"
                )))
            }
        };
        gen.sampler.update = self
            .sampler
            .parse::<BlockUpdate>()
            .map_err(|e| bad(format!("--sampler: {e}")))?;
        if let RemaskStrategy::Snapshot(kind) = gen.remask {
            gen.sampler.confidence = kind;
        }
        gen.sampler.nucleus = Nucleus::new(self.top_p, NucleusRule::default())
            .map_err(|e| bad(format!("--top-p: {e}")))?;
        gen.stop_at = self.stop_at_eos.then_some(eos);
        Ok(gen)
    }
}

/// The remask strategy a `remask` setting names.
///
/// ```
/// use did_core::refine::RemaskStrategy;
/// assert_eq!(did_engine::sampling::remask_strategy("posthoc"), Ok(RemaskStrategy::PostHoc));
/// assert!(did_engine::sampling::remask_strategy("best").is_err());
/// ```
pub fn remask_strategy(s: &str) -> Result<RemaskStrategy, Error> {
    Ok(match s {
        "snapshot" => RemaskStrategy::Snapshot(ConfidenceKind::Nucleus),
        "snapshot-raw" => RemaskStrategy::Snapshot(ConfidenceKind::Raw),
        "snapshot-max" => RemaskStrategy::Snapshot(ConfidenceKind::Max),
        "posthoc" => RemaskStrategy::PostHoc,
        "random" => RemaskStrategy::Random,
        other => return Err(Error::Sampling(format!("unknown --remask {other:?}; use snapshot, snapshot-raw, snapshot-max, posthoc or random"))),
    })
}

/// A checkpoint made ready to sample: the model, its weights, the resolved generate settings and
/// the prompt (BOS, then the prompt's tokens).
pub struct Prepared {
    /// The network.
    pub model: Transformer,
    weights: Vec<f32>,
    format: WeightFormat,
    /// Plan, sampler, remasking, scope, seed.
    pub gen: GenerateConfig,
    /// The pinned start of every sample.
    pub prompt: Vec<u32>,
    /// Sequence length.
    pub len: usize,
    /// The checkpoint's tokenizer.
    pub tokenizer: Tokenizer,
    /// A causal (gpt2) model: sampled left to right, one token per call (the AR baseline); the
    /// stage plan and remasking do not apply.
    pub causal: bool,
    /// Asked between two model calls; `true` stops the generation (the CLI's Ctrl-C).
    pub stop: fn() -> bool,
}

/// Where a generation's wall time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Timed {
    /// The whole generation, model set-up included.
    pub wall_s: f64,
    /// Each stage begun, the draft first.
    pub stages: Vec<StageTime>,
}

impl Timed {
    /// `block 4: 812 calls in 40.2 s; …`, one entry per stage begun, or
    /// `before its first model call` when none was.
    ///
    /// ```
    /// use did_engine::sampling::{StageTime, Timed};
    /// let t = Timed { wall_s: 1.0, stages: vec![StageTime { block_size: 4, calls: 12, seconds: 1.25 }] };
    /// assert_eq!(t.progress(), "block 4: 12 calls in 1.2 s");
    /// ```
    pub fn progress(&self) -> String {
        if self.stages.is_empty() {
            return "before its first model call".into();
        }
        self.stages
            .iter()
            .map(|s| {
                format!(
                    "block {}: {} calls in {:.1} s",
                    s.block_size, s.calls, s.seconds
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The stages as JSON: `[{"block": 4, "calls": 1023, "model_s": 12.1}, …]`.
    pub fn stages_json(&self) -> serde_json::Value {
        self.stages
            .iter()
            .map(|s| serde_json::json!({"block": s.block_size, "calls": s.calls, "model_s": s.seconds}))
            .collect()
    }
}

/// One finished sample.
#[derive(Debug, Clone)]
pub struct Drawn {
    /// Its tokens up to its end (BOS first).
    pub tokens: Vec<u32>,
    /// Denoiser calls over every stage.
    pub nfe: u32,
    /// Its share of the batch's wall time.
    pub seconds: f64,
}

impl Prepared {
    /// Loads `checkpoint` and checks `settings` against it.
    pub fn load(checkpoint: &Path, settings: &SamplingSettings) -> Result<Self, Error> {
        let bad = Error::Sampling;
        let ckpt = checkpoint::load(checkpoint)?;
        let config = ckpt.config;
        let causal = config.architecture == Architecture::Gpt2;
        let tokenizer = Tokenizer::new(tokenizer_for(config.vocab_size)?);
        let len = settings.length.unwrap_or(config.context);
        if causal && len > config.context {
            return Err(bad(format!(
                "--length {len}: {} is a causal model with learned positions up to {}; sample at most that many tokens",
                checkpoint.display(),
                config.context
            )));
        }
        // A causal model has no stages: one "block" of the whole length stands in.
        let stages = if causal {
            "L"
        } else {
            settings.stages.as_str()
        };
        let eos = tokenizer.kind().eos();
        let gen = settings.generate_config(stages, len, eos)?;
        let mut prompt = vec![eos];
        if let Some(p) = &settings.prompt {
            prompt.extend(tokenizer.encode(p));
        }
        if prompt.len() >= len {
            return Err(bad(format!("the prompt is {} tokens with BOS, the length only {len}; shorten --prompt or raise --length", prompt.len())));
        }
        if settings.batch == 0 || settings.num_samples == 0 {
            return Err(bad("--batch and --num-samples must be at least 1".into()));
        }
        let format: WeightFormat = settings
            .weights
            .parse()
            .map_err(|e: UnknownWeightFormat| bad(format!("--weights: {e}")))?;
        let weights = if settings.no_ema {
            ckpt.params
        } else {
            ckpt.ema.unwrap_or(ckpt.params)
        };
        Ok(Prepared {
            model: Transformer::new(config).map_err(|e| bad(e.to_string()))?,
            weights,
            format,
            gen,
            prompt,
            len,
            tokenizer,
            causal,
            stop: || false,
        })
    }

    /// The weights sampled with (the EMA's unless `no_ema`).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// How the weight matrices are stored on the backend.
    pub fn weight_format(&self) -> WeightFormat {
        self.format
    }

    /// The weights on `be`, their matrices stored as `--weights` says.
    pub fn upload<B: Backend>(&self, be: &B) -> Result<B::Buffer, Error> {
        be.upload_weights(&self.weights, &self.model.weight_matrices(), self.format)
            .map_err(|e| Error::Sampling(format!("--weights {}: {e}", self.format)))
    }

    /// Samples `first_sample ..= first_sample + n − 1` of a diffusion model as one batch, with
    /// each stage's time in the model; stops between two model calls when [`Prepared::stop`]
    /// says so (an error that says how far it got).
    pub fn generate_timed<B: Backend>(
        &self,
        be: &B,
        params: &B::Buffer,
        first_sample: u32,
        n: usize,
    ) -> Result<(Generation, Timed), Error> {
        let prompts: Vec<&[u32]> = vec![&self.prompt; n];
        let mut gen = self.gen.clone();
        gen.first_sample = first_sample;
        let t0 = Instant::now();
        let denoiser = DiffusionDenoiser::new(be, &self.model, params, true)
            .map_err(|e| Error::Sampling(e.to_string()))?;
        let mut clock = StageClock::new(denoiser, self.stop);
        let result = generate(&mut clock, &gen, &prompts);
        let wall_s = t0.elapsed().as_secs_f64();
        match result {
            Ok(g) => {
                let stages = clock.stages(&g);
                Ok((g, Timed { wall_s, stages }))
            }
            Err(GenerateError::Denoiser(ClockError::Stopped)) => {
                let timed = Timed {
                    wall_s,
                    stages: clock.segments().to_vec(),
                };
                Err(Error::Interrupted(format!(
                    "interrupted after {:.1} s of a batch of {n} ({}; the plan has {} stages)",
                    timed.wall_s,
                    timed.progress(),
                    gen.plan.stages().len()
                )))
            }
            Err(e) => Err(Error::Sampling(e.to_string())),
        }
    }

    /// Samples `first_sample ..= first_sample + n − 1` as one batch, one [`Drawn`] per sample;
    /// a causal model left to right.
    pub fn draw<B: Backend>(
        &self,
        be: &B,
        params: &B::Buffer,
        first_sample: u32,
        n: usize,
    ) -> Result<Vec<Drawn>, Error> {
        if self.causal {
            return self.draw_causal(be, params, first_sample, n);
        }
        let (g, timed) = self.generate_timed(be, params, first_sample, n)?;
        Ok((0..n)
            .map(|s| {
                let end = g
                    .batch
                    .lengths
                    .get(s)
                    .copied()
                    .unwrap_or(self.len)
                    .min(self.len);
                Drawn {
                    tokens: g.batch.tokens[s * self.len..s * self.len + end].to_vec(),
                    // The calls this sample took part in: its NFE alone (the batch's call
                    // count is the largest of these; adaptive rules make them differ).
                    nfe: g.sequence_nfe(s),
                    seconds: timed.wall_s / n as f64,
                }
            })
            .collect())
    }

    fn draw_causal<B: Backend>(
        &self,
        be: &B,
        params: &B::Buffer,
        first_sample: u32,
        n: usize,
    ) -> Result<Vec<Drawn>, Error> {
        let prompts: Vec<&[u32]> = vec![&self.prompt; n];
        let t0 = Instant::now();
        let g = CausalSampler::new(be, &self.model, params)
            .and_then(|mut sampler| {
                sampler.generate(
                    &prompts,
                    self.len,
                    &self.gen.sampler.nucleus,
                    self.gen.seed,
                    first_sample,
                    self.gen.stop_at,
                )
            })
            .map_err(|e| Error::Sampling(e.to_string()))?;
        let wall = t0.elapsed().as_secs_f64();
        Ok((0..n)
            .map(|s| Drawn {
                tokens: g.tokens[s * self.len..s * self.len + g.lengths[s]].to_vec(),
                nfe: g.nfe,
                seconds: wall / n as f64,
            })
            .collect())
    }
}
