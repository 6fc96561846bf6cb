//! `did sample`: draft → remask → refine from a checkpoint, text out.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use did_core::backend::Backend;
use did_core::model::{Architecture, DiffusionDenoiser, Transformer};
use did_core::refine::{generate, GenerateConfig, RemaskScope, RemaskStrategy, StagePlan};
use did_core::sample::categorical::ConfidenceKind;
use did_core::sample::nucleus::{Nucleus, NucleusRule};
use did_core::sample::update::BlockUpdate;

use crate::checkpoint;
use crate::data::tokenizer::{Tokenizer, TokenizerKind};

/// Everything `did sample` is told.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// The checkpoint.
    pub checkpoint: PathBuf,
    /// Stage plan (`4`, `4,L:0.25`, …).
    pub stages: String,
    /// snapshot | snapshot-raw | snapshot-max | posthoc | random.
    pub remask: String,
    /// global | block.
    pub scope: String,
    /// first-hitting | ddpm:T.
    pub sampler: String,
    /// Nucleus p.
    pub top_p: f64,
    /// Seed.
    pub seed: u64,
    /// Samples in total.
    pub num_samples: usize,
    /// Sequences per generate call.
    pub batch: usize,
    /// Sequence length (default: the model's context).
    pub length: Option<usize>,
    /// Text the samples start with (pinned, never remasked).
    pub prompt: Option<String>,
    /// End each sample at its first drawn EOS.
    pub stop_at_eos: bool,
    /// JSONL output.
    pub out: Option<PathBuf>,
    /// Print the draft with the remasked tokens marked, then the refined text.
    pub show_diff: bool,
    /// Use the trained weights instead of the EMA ones.
    pub no_ema: bool,
    /// Colour on a terminal.
    pub color: bool,
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

fn block_update(s: &str) -> Result<BlockUpdate, String> {
    if s == "first-hitting" {
        return Ok(BlockUpdate::FirstHitting);
    }
    match s.strip_prefix("ddpm:").map(str::parse::<u32>) {
        Some(Ok(steps)) if steps >= 1 => Ok(BlockUpdate::DdpmCaching { steps }),
        _ => Err(format!(
            "unknown --sampler {s:?}; use first-hitting or ddpm:T with T ≥ 1 steps per block"
        )),
    }
}

/// The tokenizer a vocabulary belongs to.
pub fn tokenizer_for(vocab: usize) -> Result<TokenizerKind, String> {
    [TokenizerKind::Gpt2, TokenizerKind::Bytes]
        .into_iter()
        .find(|k| k.vocab_size() as usize == vocab)
        .ok_or_else(|| format!("a vocabulary of {vocab} matches neither the gpt2 (50258) nor the bytes (258) tokenizer"))
}

/// Runs sampling; returns the text printed to stdout.
pub fn sample<B: Backend>(be: &B, opts: &SampleOptions) -> Result<String, String> {
    let ckpt = checkpoint::load(&opts.checkpoint)?;
    let config = ckpt.config;
    if config.architecture != Architecture::Dit {
        return Err(format!(
            "{} is a causal (gpt2) model; sampling by denoising needs a diffusion (dit) checkpoint",
            opts.checkpoint.display()
        ));
    }
    let tokenizer = Tokenizer::new(tokenizer_for(config.vocab_size)?);
    let len = opts.length.unwrap_or(config.context);
    let plan = opts
        .stages
        .parse::<StagePlan>()
        .and_then(|p| p.resolve(len))
        .map_err(|e| format!("--stages: {e}"))?;
    let mut gen = GenerateConfig::new(plan, opts.seed);
    gen.remask = remask_strategy(&opts.remask)?;
    gen.scope = match opts.scope.as_str() {
        "global" => RemaskScope::Global,
        "block" => RemaskScope::PerBlock,
        other => return Err(format!("unknown --scope {other:?}; use global or block")),
    };
    gen.sampler.update = block_update(&opts.sampler)?;
    gen.sampler.nucleus =
        Nucleus::new(opts.top_p, NucleusRule::default()).map_err(|e| format!("--top-p: {e}"))?;
    let eos = tokenizer.kind().eos();
    gen.stop_at = opts.stop_at_eos.then_some(eos);
    let mut prompt = vec![eos];
    if let Some(p) = &opts.prompt {
        prompt.extend(tokenizer.encode(p));
    }
    if prompt.len() >= len {
        return Err(format!("the prompt is {} tokens with BOS, the length only {len}; shorten --prompt or raise --length", prompt.len()));
    }
    if opts.batch == 0 || opts.num_samples == 0 {
        return Err("--batch and --num-samples must be at least 1".into());
    }
    let model = Transformer::new(config).map_err(|e| e.to_string())?;
    let weights = if opts.no_ema {
        &ckpt.params
    } else {
        ckpt.ema.as_ref().unwrap_or(&ckpt.params)
    };
    let params = be.upload(weights).map_err(|e| e.to_string())?;
    let mut jsonl = match &opts.out {
        Some(p) => Some(
            std::fs::File::create(p).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let mut text_out = String::new();
    let mut done = 0;
    while done < opts.num_samples {
        let n = opts.batch.min(opts.num_samples - done);
        let prompts: Vec<&[u32]> = vec![&prompt; n];
        gen.first_sample = done as u32;
        let t0 = Instant::now();
        let mut denoiser =
            DiffusionDenoiser::new(be, &model, &params, true).map_err(|e| e.to_string())?;
        let g = generate(&mut denoiser, &gen, &prompts).map_err(|e| e.to_string())?;
        let wall = t0.elapsed().as_secs_f64();
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
                    mark(&tokenizer, &draft[1..end], &remasked, 1, opts.color),
                    mark(&tokenizer, &final_tokens[1..end], &remasked, 1, opts.color)
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
                    "nfe": g.stages.iter().map(|st| st.nfe).collect::<Vec<_>>(),
                    "block_sizes": g.stages.iter().map(|st| st.block_size).collect::<Vec<_>>(),
                    "wall_s": wall / n as f64,
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
