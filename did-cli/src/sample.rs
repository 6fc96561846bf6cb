//! `did sample`: draft → remask → refine from a checkpoint, text out.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use did_core::backend::Backend;
use did_core::model::{Architecture, CausalSampler, DiffusionDenoiser, Transformer};
use did_core::refine::{
    generate, GenerateConfig, GenerateError, Generation, RemaskScope, RemaskStrategy, StagePlan,
};
use did_core::sample::categorical::ConfidenceKind;
use did_core::sample::nucleus::{Nucleus, NucleusRule};
use did_core::sample::update::BlockUpdate;

use crate::checkpoint;
use crate::data::tokenizer::{tokenizer_for, Tokenizer};
use crate::stage_clock::{ClockError, StageClock, StageTime};

/// The sampling settings shared by `did sample` and `did eval gen-ppl`.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Stage plan: the draft, then one `block:remask` per refine stage; any stage may add
    /// `@rule`. Block: a size or L (the length). Remask: a fraction (0.25), or `below:c`
    /// / `below:c:min..max` (every token drawn with confidence below c, between the
    /// fractions). Rule: as --sampler. E.g. `4@threshold:0.9,L:below:0.5:0.05..0.5@entropy:0.3`.
    #[arg(long, default_value = "4,L:0.25")]
    pub stages: String,
    /// How tokens are chosen for remasking: snapshot, snapshot-raw, snapshot-max, posthoc,
    /// random. The snapshot kinds also set the confidence that threshold:τ and topk:k rank by.
    #[arg(long, default_value = "snapshot")]
    pub remask: String,
    /// Lowest fraction over the whole sequence (global) or within each draft block (block).
    #[arg(long, default_value = "global")]
    pub scope: String,
    /// How each block is filled, for stages that name no `@rule`: first-hitting (one token
    /// per call), ddpm:T (T steps per block), threshold:τ (every draw surer than τ per call,
    /// at least one), entropy:β (lowest-entropy draws while their entropies less the largest
    /// sum to ≤ β nats), topk:k (the k surest per call).
    #[arg(long, default_value = "first-hitting")]
    pub sampler: String,
    /// Nucleus (top-p) of every draw.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Samples to draw.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Sequence length (default: the model's context).
    #[arg(long)]
    pub length: Option<usize>,
    /// Text every sample starts with (pinned: never remasked).
    #[arg(long)]
    pub prompt: Option<String>,
    /// End each sample at its first drawn end-of-text token.
    #[arg(long)]
    pub stop_at_eos: bool,
    /// Sample with the trained weights instead of the EMA weights.
    #[arg(long)]
    pub no_ema: bool,
    /// Allow a last stage smaller than the length (`4,16:0.25` refines block by
    /// block: the small-refine-block ablation).
    #[arg(long)]
    pub local_final: bool,
}

/// Everything `did sample` is told.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// The checkpoint.
    pub checkpoint: PathBuf,
    /// What and how to sample.
    pub sampling: SamplingArgs,
    /// JSONL output.
    pub out: Option<PathBuf>,
    /// Print the draft with the remasked tokens marked, then the refined text.
    pub show_diff: bool,
    /// Colour on a terminal.
    pub color: bool,
}

/// A checkpoint made ready to sample: the model, its weights, the resolved
/// generate settings and the prompt (BOS, then the prompt's tokens).
pub struct Prepared {
    /// The network.
    pub model: Transformer,
    weights: Vec<f32>,
    /// Plan, sampler, remasking, scope, seed.
    pub gen: GenerateConfig,
    /// The pinned start of every sample.
    pub prompt: Vec<u32>,
    /// Sequence length.
    pub len: usize,
    /// The checkpoint's tokenizer.
    pub tokenizer: Tokenizer,
    /// A causal (gpt2) model: sampled left to right, one token per call
    /// (the AR baseline); the stage plan and remasking do not apply.
    pub causal: bool,
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
    /// Loads `checkpoint` and checks `args` against it.
    pub fn load(checkpoint: &Path, args: &SamplingArgs) -> Result<Self, String> {
        let ckpt = checkpoint::load(checkpoint)?;
        let config = ckpt.config;
        let causal = config.architecture == Architecture::Gpt2;
        let tokenizer = Tokenizer::new(tokenizer_for(config.vocab_size)?);
        let len = args.length.unwrap_or(config.context);
        if causal && len > config.context {
            return Err(format!(
                "--length {len}: {} is a causal model with learned positions up to {}; sample at most that many tokens",
                checkpoint.display(),
                config.context
            ));
        }
        // A causal model has no stages: one "block" of the whole length stands in.
        let stages = if causal { "L" } else { args.stages.as_str() };
        let plan = stages
            .parse::<StagePlan>()
            .and_then(|p| p.resolve_with(len, !args.local_final))
            .map_err(|e| format!("--stages: {e}"))?;
        let mut gen = GenerateConfig::new(plan, args.seed);
        gen.remask = remask_strategy(&args.remask)?;
        gen.scope = match args.scope.as_str() {
            "global" => RemaskScope::Global,
            "block" => RemaskScope::PerBlock,
            other => return Err(format!("unknown --scope {other:?}; use global or block")),
        };
        gen.sampler.update = args
            .sampler
            .parse::<BlockUpdate>()
            .map_err(|e| format!("--sampler: {e}"))?;
        if let RemaskStrategy::Snapshot(kind) = gen.remask {
            gen.sampler.confidence = kind;
        }
        gen.sampler.nucleus = Nucleus::new(args.top_p, NucleusRule::default())
            .map_err(|e| format!("--top-p: {e}"))?;
        let eos = tokenizer.kind().eos();
        gen.stop_at = args.stop_at_eos.then_some(eos);
        let mut prompt = vec![eos];
        if let Some(p) = &args.prompt {
            prompt.extend(tokenizer.encode(p));
        }
        if prompt.len() >= len {
            return Err(format!("the prompt is {} tokens with BOS, the length only {len}; shorten --prompt or raise --length", prompt.len()));
        }
        if args.batch == 0 || args.num_samples == 0 {
            return Err("--batch and --num-samples must be at least 1".into());
        }
        let weights = if args.no_ema {
            ckpt.params
        } else {
            ckpt.ema.unwrap_or(ckpt.params)
        };
        Ok(Prepared {
            model: Transformer::new(config).map_err(|e| e.to_string())?,
            weights,
            gen,
            prompt,
            len,
            tokenizer,
            causal,
        })
    }

    /// The weights on `be`.
    pub fn upload<B: Backend>(&self, be: &B) -> Result<B::Buffer, String> {
        be.upload(&self.weights).map_err(|e| e.to_string())
    }

    /// Samples `first_sample ..= first_sample + n − 1` of a diffusion model
    /// as one batch, with the batch's wall time.
    pub fn generate<B: Backend>(
        &self,
        be: &B,
        params: &B::Buffer,
        first_sample: u32,
        n: usize,
    ) -> Result<(Generation, f64), String> {
        self.generate_timed(be, params, first_sample, n)
            .map(|(g, timed)| (g, timed.wall_s))
    }

    /// Like [`Prepared::generate`], with each stage's time in the model; stops between two
    /// model calls when Ctrl-C is pressed (an error that says how far it got).
    pub fn generate_timed<B: Backend>(
        &self,
        be: &B,
        params: &B::Buffer,
        first_sample: u32,
        n: usize,
    ) -> Result<(Generation, Timed), String> {
        let prompts: Vec<&[u32]> = vec![&self.prompt; n];
        let mut gen = self.gen.clone();
        gen.first_sample = first_sample;
        let t0 = Instant::now();
        let denoiser =
            DiffusionDenoiser::new(be, &self.model, params, true).map_err(|e| e.to_string())?;
        let mut clock = StageClock::new(denoiser, crate::interrupt::requested);
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
                Err(format!(
                    "interrupted after {:.1} s of a batch of {n} ({}; the plan has {} stages)",
                    timed.wall_s,
                    timed.progress(),
                    gen.plan.stages().len()
                ))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Like [`Prepared::generate`], one [`Drawn`] per sample.
    pub fn draw<B: Backend>(
        &self,
        be: &B,
        params: &B::Buffer,
        first_sample: u32,
        n: usize,
    ) -> Result<Vec<Drawn>, String> {
        if self.causal {
            let prompts: Vec<&[u32]> = vec![&self.prompt; n];
            let t0 = Instant::now();
            let g = CausalSampler::new(be, &self.model, params)
                .and_then(|mut sampler| {
                    sampler.generate(
                        &prompts,
                        self.len,
                        &self.gen.sampler.nucleus,
                        self.gen.sampler.seed,
                        first_sample,
                        self.gen.stop_at,
                    )
                })
                .map_err(|e| e.to_string())?;
            let wall = t0.elapsed().as_secs_f64();
            return Ok((0..n)
                .map(|s| Drawn {
                    tokens: g.tokens[s * self.len..s * self.len + g.lengths[s]].to_vec(),
                    nfe: g.nfe,
                    seconds: wall / n as f64,
                })
                .collect());
        }
        let (g, wall) = self.generate(be, params, first_sample, n)?;
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
                    seconds: wall / n as f64,
                }
            })
            .collect())
    }
}

fn remask_strategy(s: &str) -> Result<RemaskStrategy, String> {
    Ok(match s {
        "snapshot" => RemaskStrategy::Snapshot(ConfidenceKind::Nucleus),
        "snapshot-raw" => RemaskStrategy::Snapshot(ConfidenceKind::Raw),
        "snapshot-max" => RemaskStrategy::Snapshot(ConfidenceKind::Max),
        "posthoc" => RemaskStrategy::PostHoc,
        "random" => RemaskStrategy::Random,
        other => return Err(format!("unknown --remask {other:?}; use snapshot, snapshot-raw, snapshot-max, posthoc or random")),
    })
}

/// Runs sampling; returns the text printed to stdout.
pub fn sample<B: Backend>(be: &B, opts: &SampleOptions) -> Result<String, String> {
    let prep = Prepared::load(&opts.checkpoint, &opts.sampling)?;
    let (len, tokenizer) = (prep.len, &prep.tokenizer);
    let params = prep.upload(be)?;
    let mut jsonl = match &opts.out {
        Some(p) => Some(
            std::fs::File::create(p).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
        ),
        None => None,
    };
    // Ctrl-C stops between two model calls; the batches written so far stay.
    crate::interrupt::install();
    let mut text_out = String::new();
    let mut done = 0;
    let total = opts.sampling.num_samples;
    while done < total {
        let n = opts.sampling.batch.min(total - done);
        if prep.causal {
            for (s, d) in prep
                .draw(be, &params, done as u32, n)?
                .into_iter()
                .enumerate()
            {
                let text = tokenizer.decode(&d.tokens[1..]);
                text_out.push_str(&format!("--- sample {}\n{text}\n", done + s));
                if let Some(f) = jsonl.as_mut() {
                    let line = serde_json::json!({
                        "sample": done + s,
                        "tokens": &d.tokens,
                        "text": text,
                        "nfe": [d.nfe],
                        "block_sizes": [1],
                        "wall_s": d.seconds,
                    });
                    writeln!(f, "{line}")
                        .map_err(|e| format!("cannot write the JSONL output: {e}"))?;
                }
            }
            done += n;
            continue;
        }
        crate::interrupt::install();
        let (g, timed) =
            prep.generate_timed(be, &params, done as u32, n)
                .map_err(|e| match &opts.out {
                    Some(p) if done > 0 => format!(
                        "{e}; the {done} samples before this batch are in {}",
                        p.display()
                    ),
                    _ => e,
                })?;
        let wall = timed.wall_s;
        for s in 0..n {
            let seq = |tokens: &[u32]| tokens[s * len..(s + 1) * len].to_vec();
            let final_tokens = seq(&g.batch.tokens);
            let end = g.batch.lengths.get(s).copied().unwrap_or(len).min(len);
            let text = tokenizer.decode(&final_tokens[1..end]);
            let draft = seq(&g.stages[0].tokens);
            let remasked: Vec<usize> = g
                .stages
                .iter()
                .skip(1)
                .flat_map(|st| st.remasked[s].iter().copied())
                .collect();
            if opts.show_diff && g.stages.len() > 1 {
                text_out.push_str(&format!(
                    "--- sample {} draft (remasked tokens marked)\n{}\n--- refined\n{}\n",
                    done + s,
                    mark(tokenizer, &draft[1..end], &remasked, 1, opts.color),
                    mark(tokenizer, &final_tokens[1..end], &remasked, 1, opts.color)
                ));
            } else {
                text_out.push_str(&format!("--- sample {}\n{text}\n", done + s));
            }
            if let Some(f) = jsonl.as_mut() {
                let line = serde_json::json!({
                    "sample": done + s,
                    "tokens": &final_tokens[..end],
                    "text": text,
                    "draft_text": tokenizer.decode(&draft[1..end]),
                    "remasked": remasked,
                    // Each position's snapshot confidence (the nucleus probability of the drawn
                    // token when it was last drawn); null where the token was given, not drawn.
                    "confidence": g.batch.confidence[s * len..s * len + end]
                        .iter()
                        .map(|c| c.nucleus.is_finite().then_some(c.nucleus))
                        .collect::<Vec<_>>(),
                    "nfe": g.stages.iter().map(|st| st.sequence_nfe.get(s).copied().unwrap_or(st.nfe)).collect::<Vec<_>>(),
                    "batch_nfe": g.stages.iter().map(|st| st.nfe).collect::<Vec<_>>(),
                    "block_sizes": g.stages.iter().map(|st| st.block_size).collect::<Vec<_>>(),
                    "wall_s": wall / n as f64,
                    // The batch's, shared by its samples as wall_s is.
                    "batch_stages": timed.stages_json(),
                });
                writeln!(f, "{line}").map_err(|e| format!("cannot write the JSONL output: {e}"))?;
            }
        }
        done += n;
    }
    Ok(text_out)
}

/// The text of `tokens` with the positions in `marked` (offset by `base`) highlighted.
fn mark(
    tokenizer: &Tokenizer,
    tokens: &[u32],
    marked: &[usize],
    base: usize,
    color: bool,
) -> String {
    let mut out = String::new();
    for (i, &t) in tokens.iter().enumerate() {
        let piece = tokenizer.decode(&[t]);
        if marked.contains(&(i + base)) {
            if color {
                out.push_str(&format!("\x1b[1;33m{piece}\x1b[0m"));
            } else {
                out.push_str(&format!("[[{piece}]]"));
            }
        } else {
            out.push_str(&piece);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_names_each_stage_begun_or_says_none_was() {
        let none = Timed {
            wall_s: 0.0,
            stages: Vec::new(),
        };
        assert_eq!(none.progress(), "before its first model call");
        let two = Timed {
            wall_s: 3.0,
            stages: vec![
                StageTime {
                    block_size: 4,
                    calls: 12,
                    seconds: 1.25,
                },
                StageTime {
                    block_size: 64,
                    calls: 3,
                    seconds: 0.5,
                },
            ],
        };
        assert_eq!(
            two.progress(),
            "block 4: 12 calls in 1.2 s; block 64: 3 calls in 0.5 s"
        );
    }
}
