//! `did sample`: draft → remask → refine from a checkpoint, text out.

use std::io::Write;
use std::path::PathBuf;

use did_core::backend::Backend;
use did_engine::sampling::{Prepared, SamplingSettings};

use crate::data::tokenizer::Tokenizer;

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
    /// How the weight matrices are stored while sampling: f32 (as trained), bf16 (half the
    /// bytes) or int8 (a quarter; CPU only). On a CPU a draft call reads every weight, so
    /// narrower weights sample faster (docs/cpu-inference.md has the speeds and the quality).
    #[arg(long, default_value = "f32")]
    pub weights: String,
}

impl From<&SamplingArgs> for SamplingSettings {
    fn from(a: &SamplingArgs) -> Self {
        SamplingSettings {
            stages: a.stages.clone(),
            remask: a.remask.clone(),
            scope: a.scope.clone(),
            sampler: a.sampler.clone(),
            top_p: a.top_p,
            seed: a.seed,
            num_samples: a.num_samples,
            batch: a.batch,
            length: a.length,
            prompt: a.prompt.clone(),
            stop_at_eos: a.stop_at_eos,
            no_ema: a.no_ema,
            local_final: a.local_final,
            weights: a.weights.clone(),
        }
    }
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

/// Runs sampling; returns the text printed to stdout.
pub fn sample<B: Backend>(be: &B, opts: &SampleOptions) -> Result<String, String> {
    let mut prep = Prepared::load(&opts.checkpoint, &(&opts.sampling).into())?;
    prep.stop = crate::interrupt::requested;
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
        let (g, timed) =
            prep.generate_timed(be, &params, done as u32, n)
                .map_err(|e| match &opts.out {
                    Some(p) if done > 0 => format!(
                        "{e}; the {done} samples before this batch are in {}",
                        p.display()
                    ),
                    _ => e.to_string(),
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
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        sampling: SamplingArgs,
    }

    #[test]
    fn flags_left_out_mean_the_settings_defaults() {
        let flags = Flags::try_parse_from(["did"]).unwrap();
        assert_eq!(
            SamplingSettings::from(&flags.sampling),
            SamplingSettings::default()
        );
        let flags =
            Flags::try_parse_from(["did", "--stages", "4@entropy:1", "--seed", "9"]).unwrap();
        let s = SamplingSettings::from(&flags.sampling);
        assert_eq!((s.stages.as_str(), s.seed), ("4@entropy:1", 9));
    }
}
