//! Reading what `scripts/reproduce.sh` left under its results folder:
//! `models/<name>/metrics.jsonl`, `nelbo/<model>.block-<b>.json`,
//! `samples/<experiment>.seed-<s>.json` (the JSON of `did eval nelbo` and
//! `did eval gen-ppl`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Mean and spread (sample standard deviation) of one figure over seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (0 for a single seed).
    pub std: f64,
    /// Seeds it is over.
    pub n: usize,
}

impl Stat {
    /// The statistic of `values`.
    pub fn of(values: &[f64]) -> Stat {
        let n = values.len();
        if n == 0 {
            return Stat {
                mean: f64::NAN,
                std: f64::NAN,
                n,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Stat {
            mean,
            std: var.sqrt(),
            n,
        }
    }
}

/// One seed of one experiment: what `did eval gen-ppl --json` reported.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRun {
    /// The sampling seed.
    pub seed: u64,
    /// Samples scored.
    pub samples: usize,
    /// AR-judge perplexity, mean of per-sample (the paper's figure).
    pub gen_ppl: f64,
    /// AR-judge perplexity over all tokens at once.
    pub gen_ppl_token_weighted: f64,
    /// Word-trigram perplexity, OOV words charged the rarest word's probability.
    pub word_ppl_charged: f64,
    /// Word-trigram perplexity, OOV words skipped (CMU's own aggregation).
    pub word_ppl_pooled: f64,
    /// Share of words the trigram model does not know.
    pub oov_rate: f64,
    /// Mean unigram entropy of the samples (nats).
    pub entropy: f64,
    /// Denoiser (or causal model) calls per sample.
    pub nfe: f64,
    /// Wall seconds of sampling per sample (its share of the batch).
    pub seconds_per_sample: f64,
    /// Degenerate samples drawn again.
    pub regenerated: u64,
    /// The regeneration threshold (nats).
    pub regen_threshold: f64,
    /// The first sample's text.
    pub first_text: Option<String>,
}

/// An experiment: one model, one sampler setting, every seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    /// Its name in the script (`mix.snapshot`, …).
    pub name: String,
    /// The model sampled (the folder under `models/`).
    pub model: String,
    /// The stage plan (`None` for the AR model).
    pub stages: Option<String>,
    /// The remasking strategy (`None` where nothing is refined).
    pub remask: Option<String>,
    /// One entry per seed, ascending.
    pub runs: Vec<SeedRun>,
}

impl Experiment {
    /// A figure's mean ± spread over the seeds.
    pub fn stat(&self, f: impl Fn(&SeedRun) -> f64) -> Stat {
        Stat::of(&self.runs.iter().map(f).collect::<Vec<_>>())
    }

    /// Wall seconds per sample of the fastest seed: other work on the machine
    /// only ever adds time, so the minimum is the estimate of the sampler's own.
    pub fn fastest_seconds_per_sample(&self) -> f64 {
        self.runs
            .iter()
            .map(|r| r.seconds_per_sample)
            .filter(|s| s.is_finite())
            .fold(f64::NAN, f64::min)
    }
}

/// One validation NELBO evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct NelboRow {
    /// The model.
    pub model: String,
    /// Block size of the bound; `None` for the causal model (exact).
    pub block: Option<usize>,
    /// Negative log-likelihood bound per token (nats).
    pub nll_per_token: f64,
    /// `exp` of it.
    pub perplexity: f64,
    /// Tokens counted.
    pub tokens: u64,
}

/// A trained model's run, from its `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainedModel {
    /// The folder name.
    pub name: String,
    /// (step, training loss) per step.
    pub loss: Vec<(u64, f64)>,
    /// (step, validation loss) where measured.
    pub valid_loss: Vec<(u64, f64)>,
    /// Mean training throughput.
    pub tokens_per_s: f64,
    /// Wall seconds of training (summed over resumed runs), when recorded.
    pub wall_seconds: Option<f64>,
}

/// Everything the report is made from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    /// Experiments by name.
    pub experiments: BTreeMap<String, Experiment>,
    /// NELBO rows, by model then block.
    pub nelbo: Vec<NelboRow>,
    /// Trained models by name.
    pub models: BTreeMap<String, TrainedModel>,
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn parse_json(text: &str, path: &Path) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

fn num(v: &Value, key: &str, path: &Path) -> Result<f64, String> {
    // `did` writes a non-finite figure (no word scored, say) as null: not measured.
    if v.get(key).is_some_and(Value::is_null) {
        return Ok(f64::NAN);
    }
    v.get(key).and_then(Value::as_f64).ok_or_else(|| {
        format!(
            "{}: no number {key:?}; was it written by this version of `did eval`? Delete it and rerun scripts/reproduce.sh",
            path.display()
        )
    })
}

fn files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    out.sort();
    Ok(out)
}

/// The model folder a checkpoint path names (`…/models/<name>/ckpt-….safetensors`).
fn model_of(checkpoint: &str) -> String {
    Path::new(checkpoint)
        .parent()
        .and_then(Path::file_name)
        .map_or_else(
            || checkpoint.to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
}

/// Reads `samples/<name>.seed-<seed>.json`: the experiment's name, the
/// model, the seed's figures and the whole JSON.
pub fn read_seed_run(path: &Path) -> Result<(String, String, SeedRun, Value), String> {
    parse_seed_run(path, &read(path)?)
}

/// [`read_seed_run`] of a file's text (`path` names it in errors and gives the name and seed).
pub fn parse_seed_run(path: &Path, text: &str) -> Result<(String, String, SeedRun, Value), String> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (name, seed) = stem
        .rsplit_once(".seed-")
        .and_then(|(n, s)| s.parse::<u64>().ok().map(|s| (n.to_string(), s)))
        .ok_or_else(|| {
            format!(
                "{}: expected a name like <experiment>.seed-<n>.json",
                path.display()
            )
        })?;
    let v = parse_json(text, path)?;
    // Without `--word-judge` the word figures are not measured (NaN).
    let words = v.get("word_judge").filter(|w| !w.is_null());
    let word = |key: &str| words.map_or(Ok(f64::NAN), |w| num(w, key, path));
    let samples_per_s = num(&v, "samples_per_s", path)?;
    let run = SeedRun {
        seed,
        samples: num(&v, "samples", path)? as usize,
        gen_ppl: num(&v, "gen_ppl_mean_per_sample", path)?,
        gen_ppl_token_weighted: num(&v, "gen_ppl_token_weighted", path)?,
        word_ppl_charged: word("word_ppl_oov_charged")?,
        word_ppl_pooled: word("word_ppl_pooled")?,
        oov_rate: word("oov_rate")?,
        entropy: num(&v, "entropy", path)?,
        nfe: num(&v, "nfe_mean", path)?,
        seconds_per_sample: if samples_per_s > 0.0 {
            1.0 / samples_per_s
        } else {
            f64::NAN
        },
        regenerated: num(&v, "regenerated", path)? as u64,
        regen_threshold: num(&v, "regen_threshold", path)?,
        first_text: v
            .get("per_sample")
            .and_then(|p| p.get(0))
            .and_then(|p| p.get("text"))
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    let model = v
        .get("source")
        .and_then(Value::as_str)
        .map(model_of)
        .unwrap_or_default();
    Ok((name, model, run, v))
}

/// Reads a results folder; missing parts are simply absent.
pub fn load(dir: &Path) -> Result<Results, String> {
    let mut results = Results::default();
    for path in files(&dir.join("samples"))? {
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let (name, model, run, v) = read_seed_run(&path)?;
        let causal = model == "ar";
        let stages = v
            .get("stages")
            .and_then(Value::as_str)
            .filter(|_| !causal)
            .map(str::to_string);
        // A second stage refines (a draft's `@rule` has a colon too).
        let refines = stages.as_deref().is_some_and(|s| s.contains(','));
        let remask = v
            .get("remask")
            .and_then(Value::as_str)
            .filter(|_| refines)
            .map(str::to_string);
        let e = results
            .experiments
            .entry(name.clone())
            .or_insert_with(|| Experiment {
                name,
                model,
                stages,
                remask,
                runs: Vec::new(),
            });
        e.runs.push(run);
        e.runs.sort_by_key(|r| r.seed);
    }
    for path in files(&dir.join("nelbo"))? {
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        results.nelbo.push(parse_nelbo(&path, &read(&path)?)?);
    }
    results
        .nelbo
        .sort_by(|a, b| (&a.model, a.block).cmp(&(&b.model, b.block)));
    for path in files(&dir.join("models"))? {
        let metrics = path.join("metrics.jsonl");
        if !metrics.is_file() {
            continue;
        }
        let mut model = parse_metrics(&metrics, &read(&metrics)?)?;
        model.wall_seconds = std::fs::read_to_string(path.join("wall-seconds"))
            .ok()
            .map(|t| t.lines().filter_map(|l| l.trim().parse::<f64>().ok()).sum());
        results.models.insert(model.name.clone(), model);
    }
    Ok(results)
}

/// A `did eval nelbo --json` file's row.
pub fn parse_nelbo(path: &Path, text: &str) -> Result<NelboRow, String> {
    let v = parse_json(text, path)?;
    let nll = num(&v, "nll_per_token", path)?;
    Ok(NelboRow {
        model: v
            .get("checkpoint")
            .and_then(Value::as_str)
            .map(model_of)
            .unwrap_or_default(),
        block: v
            .get("block_size")
            .and_then(Value::as_u64)
            .map(|b| b as usize)
            .filter(|_| v.get("architecture").and_then(Value::as_str) != Some("Gpt2")),
        nll_per_token: nll,
        perplexity: nll.exp(),
        tokens: num(&v, "tokens", path)? as u64,
    })
}

/// A training run's `metrics.jsonl` (`path` is `models/<name>/metrics.jsonl`).
pub fn parse_metrics(path: &Path, text: &str) -> Result<TrainedModel, String> {
    let name = path
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (mut loss, mut valid_loss, mut tps) = (Vec::new(), Vec::new(), Vec::new());
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A run killed mid-write leaves a torn last line; `did train --resume` drops it too.
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => return Err(format!("{} line {}: {e}", path.display(), i + 1)),
        };
        let step = v.get("step").and_then(Value::as_u64).unwrap_or(0);
        if let Some(l) = v.get("loss").and_then(Value::as_f64) {
            loss.push((step, l));
        }
        if let Some(l) = v.get("valid_loss").and_then(Value::as_f64) {
            valid_loss.push((step, l));
        }
        if let Some(t) = v.get("tokens_per_s").and_then(Value::as_f64) {
            tps.push(t);
        }
    }
    Ok(TrainedModel {
        name,
        loss,
        valid_loss,
        tokens_per_s: Stat::of(&tps).mean,
        wall_seconds: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_mean_and_sample_spread() {
        let s = Stat::of(&[1.0, 2.0, 3.0]);
        assert_eq!((s.mean, s.std, s.n), (2.0, 1.0, 3));
        assert_eq!(Stat::of(&[5.0]).std, 0.0);
        assert!(Stat::of(&[]).mean.is_nan());
    }

    #[test]
    fn wall_time_is_the_fastest_seed() {
        let run = |seed, seconds_per_sample| SeedRun {
            seed,
            samples: 1,
            gen_ppl: 1.0,
            gen_ppl_token_weighted: 1.0,
            word_ppl_charged: 1.0,
            word_ppl_pooled: 1.0,
            oov_rate: 0.0,
            entropy: 1.0,
            nfe: 1.0,
            seconds_per_sample,
            regenerated: 0,
            regen_threshold: 0.0,
            first_text: None,
        };
        let e = Experiment {
            name: "x".into(),
            model: "m".into(),
            stages: None,
            remask: None,
            runs: vec![run(1, 2.0), run(2, 1.0), run(3, f64::NAN)],
        };
        assert_eq!(e.fastest_seconds_per_sample(), 1.0);
    }

    #[test]
    fn model_is_the_checkpoint_folder() {
        assert_eq!(
            model_of("runs/reproduce/models/mix/ckpt-00000150.safetensors"),
            "mix"
        );
    }
}
