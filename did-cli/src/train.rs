//! `did train`: the training loop around did-core's `Trainer` on the CPU
//! backend — data windows from the token shards, the objective's batches, a
//! progress bar, a JSONL metrics log, validation, crash-safe checkpoints and
//! exact resume.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use did_core::backend::Backend;
use did_core::model::{
    causal_batch, diffusion_batch, Architecture, ModelConfig, TrainBatch, Trainer, TrainerConfig,
    TrainingState, Transformer,
};
use did_core::model::{BlockSizeDistribution, ResolvedBlockSizes};
use did_core::rng::{Purpose, RngStream};
use did_core::schedule::TrainingSchedule;

use crate::checkpoint::{self, Checkpoint};
use crate::data::shard::Shard;

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// BD3 at one block size.
    Bd3(usize),
    /// A block size drawn per optimizer step.
    MixScale(BlockSizeDistribution),
    /// Block = length.
    Mdlm,
    /// Causal LM (GPT-2 architecture).
    Ar,
}

impl Objective {
    /// Parses `bd3`, `mix-scale`, `mdlm`, `ar` with the block options.
    pub fn parse(name: &str, block: usize, blocks: &str) -> Result<Self, String> {
        match name {
            "bd3" => Ok(Objective::Bd3(block)),
            "mix-scale" => Ok(Objective::MixScale(
                blocks.parse().map_err(|e| format!("--blocks: {e}"))?,
            )),
            "mdlm" => Ok(Objective::Mdlm),
            "ar" => Ok(Objective::Ar),
            other => Err(format!(
                "unknown objective {other:?}; use bd3, mix-scale, mdlm or ar"
            )),
        }
    }

    fn describe(&self) -> String {
        match self {
            Objective::Bd3(b) => format!("bd3:{b}"),
            Objective::MixScale(d) => format!("mix-scale:{d}"),
            Objective::Mdlm => "mdlm".into(),
            Objective::Ar => "ar".into(),
        }
    }
}

/// Everything `did train` is told.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Folder with `train.bin` and `valid.bin`.
    pub data: PathBuf,
    /// A preset or a TOML file.
    pub model: String,
    /// The objective.
    pub objective: Objective,
    /// Sequence length (default: the model's context).
    pub length: Option<usize>,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub accumulate: usize,
    /// Train until this many optimizer steps in total.
    pub steps: u32,
    /// Peak learning rate.
    pub lr: f32,
    /// Warm-up steps.
    pub warmup: u32,
    /// Seed of every random stream.
    pub seed: u64,
    /// Output folder (checkpoints, metrics.jsonl).
    pub out: PathBuf,
    /// Checkpoint every N steps (and at the end).
    pub checkpoint_every: u32,
    /// Checkpoints kept.
    pub keep: usize,
    /// Validation every N steps (0: only at the end).
    pub valid_every: u32,
    /// Validation micro-batches.
    pub valid_batches: usize,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    /// Start from these weights (fine-tuning).
    pub init_from: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (with a checkpoint) after this much wall time, whatever `steps` says.
    pub max_seconds: Option<f64>,
}

fn resolve_config(opts: &TrainOptions, vocab: u32) -> Result<ModelConfig, String> {
    let arch = if opts.objective == Objective::Ar {
        Architecture::Gpt2
    } else {
        Architecture::Dit
    };
    let config = if opts.model == "tiny" || opts.model == "small" {
        let mut c = ModelConfig::preset(&opts.model, arch).map_err(|e| e.to_string())?;
        // A preset takes the data's vocabulary (GPT-2 or bytes), `[MASK]` last.
        c.vocab_size = vocab as usize;
        c.mask_id = vocab - 1;
        c
    } else {
        let text = std::fs::read_to_string(&opts.model)
            .map_err(|e| format!("cannot read the model config {:?}: {e}; name a preset (tiny, small) or a TOML file", opts.model))?;
        crate::model_config::from_toml(&text)?
    };
    if config.vocab_size != vocab as usize {
        return Err(format!(
            "vocabulary mismatch: the model has {} tokens, the data {vocab}; prepare the data with the model's tokenizer or set vocab_size",
            config.vocab_size
        ));
    }
    if (opts.objective == Objective::Ar) != (config.architecture == Architecture::Gpt2) {
        return Err("the ar objective trains the gpt2 architecture and the diffusion objectives the dit; fix `architecture` or --objective".into());
    }
    if let Some(l) = opts.length {
        if l > config.context {
            return Err(format!(
                "--length {l} exceeds the model's context of {}",
                config.context
            ));
        }
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// `DID_FAULT_NAN_AT_STEP=N`: the fault-injection switch of the reliability
/// tests (a NaN enters the loss at optimizer step N).
fn fault_step() -> Result<Option<u32>, String> {
    match std::env::var("DID_FAULT_NAN_AT_STEP") {
        Err(_) => Ok(None),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| {
            format!(
                "DID_FAULT_NAN_AT_STEP={v:?} is not a step number; unset it for normal training"
            )
        }),
    }
}

/// Keeps the complete lines of `metrics.jsonl` whose step is at most `upto`.
fn trim_metrics(path: &Path, upto: u32) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // none yet
    };
    let step_of = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64())
    };
    let kept: String = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && step_of(l).is_some_and(|s| s <= u64::from(upto)))
        .collect();
    if kept.len() == text.len() {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot rewrite {}: {e}", path.display()))
}

/// Random windows of `len` tokens, addressed by (seed, micro-step, sequence): stateless, so resume is exact.
fn windows(shard: &Shard, len: usize, batch: usize, seed: u64, micro_step: u32) -> Vec<u32> {
    let room = (shard.len() - len + 1) as f64;
    let mut out = vec![0u32; batch * len];
    for (k, w) in out.chunks_mut(len).enumerate() {
        let u = RngStream::new(seed, Purpose::DataOrder, k as u32, micro_step).uniform(0, 0);
        let start = ((u * room) as usize).min(shard.len() - len);
        shard.read(start, w);
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn make_batch(
    objective: &Objective,
    blocks: &Option<ResolvedBlockSizes>,
    x: &[u32],
    batch: usize,
    len: usize,
    mask: u32,
    seed: u64,
    step: u32,
    micro: u32,
) -> Result<TrainBatch, String> {
    let block = match objective {
        Objective::Ar => return causal_batch(x, batch, len).map_err(|e| e.to_string()),
        Objective::Bd3(b) => *b,
        Objective::Mdlm => len,
        Objective::MixScale(_) => blocks.as_ref().map_or(len, |d| d.sample(seed, step)),
    };
    diffusion_batch(
        x,
        batch,
        len,
        block,
        &TrainingSchedule::default(),
        mask,
        seed,
        micro,
    )
    .map_err(|e| e.to_string())
}

/// Runs training; returns the summary printed at the end.
pub fn train<B: Backend>(be: &B, opts: &TrainOptions) -> Result<String, String> {
    // Ctrl-C: the loop saves a checkpoint after the current step and stops.
    crate::interrupt::install();
    let open = |name: &str| Shard::open(&opts.data.join(format!("{name}.bin")));
    let train_shard = open("train")?;
    let valid_shard = open("valid").ok().filter(|s| !s.is_empty());
    let vocab = train_shard.header().vocab_size;
    let config = resolve_config(opts, vocab)?;
    let len = opts.length.unwrap_or(config.context);
    if train_shard.len() < len {
        return Err(format!("the training shard has {} tokens, fewer than one sequence of {len}; use more data or a shorter --length", train_shard.len()));
    }
    if opts.batch == 0 || opts.accumulate == 0 || opts.steps == 0 {
        return Err("--batch, --accumulate and --steps must be at least 1".into());
    }
    let blocks = match &opts.objective {
        Objective::MixScale(d) => Some(d.resolve(len).map_err(|e| format!("--blocks: {e}"))?),
        Objective::Bd3(b) if *b == 0 || len % b != 0 => {
            return Err(format!("--block {b} must divide the length {len}"))
        }
        _ => None,
    };
    std::fs::create_dir_all(&opts.out).map_err(|e| {
        format!(
            "cannot create the output folder {}: {e}; choose a writable --out",
            opts.out.display()
        )
    })?;
    let model = Transformer::new(config).map_err(|e| e.to_string())?;
    let tc = TrainerConfig {
        lr: opts.lr,
        warmup_steps: opts.warmup,
        ..TrainerConfig::default()
    };
    let e = |e: did_core::model::ModelError<B::Error>| e.to_string();

    // Start: resume, fine-tune, or fresh.
    let mut trainer = start_trainer(be, &model, tc, opts)?;

    // The log matches the state resumed from: lines of steps past it (run
    // after the last checkpoint, before a crash) and a torn last line go.
    trim_metrics(&opts.out.join("metrics.jsonl"), trainer.step)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.out.join("metrics.jsonl"))
        .map_err(|e| format!("cannot write metrics.jsonl in {}: {e}", opts.out.display()))?;
    let bar = progress_bar(opts);
    bar.set_position(u64::from(trainer.step));
    let mask = config.mask_id;
    let accum = opts.accumulate as u32;
    let mut last_loss = f64::NAN;
    let mut last_valid = None;
    let save = |trainer: &Trainer<B>| save_checkpoint(be, trainer, config, opts, len);
    let validate = |trainer: &mut Trainer<B>| {
        validation_loss(be, &model, trainer, valid_shard.as_ref(), opts, len, mask)
    };
    let started = Instant::now();
    let first_step = trainer.step;
    let out_of_time = || {
        crate::interrupt::requested()
            || opts
                .max_seconds
                .is_some_and(|s| started.elapsed().as_secs_f64() >= s)
    };
    let fault_nan_at = fault_step()?;
    while trainer.step < opts.steps && !out_of_time() {
        let step = trainer.step;
        let t0 = Instant::now();
        let micro: Vec<TrainBatch> = (0..accum)
            .map(|m| {
                let ms = step * accum + m;
                let x = windows(&train_shard, len, opts.batch, opts.seed, ms);
                make_batch(
                    &opts.objective,
                    &blocks,
                    &x,
                    opts.batch,
                    len,
                    mask,
                    opts.seed,
                    step,
                    ms,
                )
            })
            .collect::<Result<_, _>>()?;
        let mut micro = micro;
        if fault_nan_at == Some(step + 1) {
            // DID_FAULT_NAN_AT_STEP: a NaN in the loss weights, to test the non-finite guard.
            micro[0].weights[0] = f32::NAN;
        }
        let report = trainer.step(be, &model, &micro).map_err(e)?;
        let tokens_per_s = (opts.batch * opts.accumulate * len) as f64 / t0.elapsed().as_secs_f64();
        last_loss = report.loss;
        let mut line = format!(
            "{{\"step\":{},\"loss\":{:?},\"grad_norm\":{:?},\"lr\":{:?},\"tokens_per_s\":{:.1}",
            report.step, report.loss, report.grad_norm, report.lr, tokens_per_s
        );
        if opts.valid_every > 0 && report.step % opts.valid_every == 0 {
            last_valid = validate(&mut trainer)?;
            if let Some(v) = last_valid {
                line.push_str(&format!(",\"valid_loss\":{v:?}"));
            }
        }
        line.push_str("}\n");
        metrics
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot write metrics.jsonl: {e}"))?;
        bar.set_position(u64::from(report.step));
        bar.set_message(format!("loss {:.4} {:.0} tok/s", report.loss, tokens_per_s));
        if report.step % opts.checkpoint_every.max(1) == 0
            || report.step == opts.steps
            || out_of_time()
        {
            save(&trainer)?;
        }
    }
    bar.finish_and_clear();
    if last_valid.is_none() {
        last_valid = validate(&mut trainer)?;
    }
    let steps_run = trainer.step - first_step;
    if crate::interrupt::requested() {
        return Err(format!(
            "interrupted: saved step {} in {}; continue with the same command and --resume",
            trainer.step,
            opts.out.display()
        ));
    }
    Ok(format!(
        "trained {} ({} parameters) with {} for {steps_run} steps (now at step {}) in {:.1} s\nlast loss {last_loss:.4}{}\ncheckpoints and metrics.jsonl in {}\n",
        config.architecture,
        model.table().total(),
        opts.objective.describe(),
        trainer.step,
        started.elapsed().as_secs_f64(),
        last_valid.map(|v| format!(", validation loss {v:.4} (perplexity bound {:.2})", v.exp())).unwrap_or_default(),
        opts.out.display()
    ))
}

/// The trainer a run starts from: its latest checkpoint (`--resume`), another run's weights
/// (`--init-from`, a fine-tune), or fresh initial values. Refuses to overwrite a run's
/// checkpoints or to resume into another model.
fn start_trainer<B: Backend>(
    be: &B,
    model: &Transformer,
    tc: TrainerConfig,
    opts: &TrainOptions,
) -> Result<Trainer<B>, String> {
    let config = model.config();
    let e = |e: did_core::model::ModelError<B::Error>| e.to_string();
    let latest = checkpoint::list(&opts.out).pop();
    Ok(match (opts.resume, latest) {
        (true, Some((_, path))) => {
            let c = checkpoint::load(&path)?;
            if &c.config != config {
                return Err(format!("{} holds another model configuration; resume with the same --model, or use a new --out", path.display()));
            }
            let state = TrainingState {
                params: c.params,
                ema: c.ema,
                moments: c.moments,
                step: c.step,
            };
            Trainer::resume(be, model, tc, &state, opts.seed).map_err(e)?
        }
        (true, None) => {
            return Err(format!(
                "--resume: no checkpoint in {}; start without --resume",
                opts.out.display()
            ))
        }
        (false, Some((_, path))) => {
            return Err(format!(
            "{} already holds checkpoints ({}); pass --resume to continue, or choose a new --out",
            opts.out.display(),
            path.display()
        ))
        }
        (false, None) => {
            let init = match &opts.init_from {
                Some(p) => {
                    let c = checkpoint::load(p)?;
                    if &c.config != config {
                        return Err(format!(
                            "--init-from {}: its model configuration differs from --model",
                            p.display()
                        ));
                    }
                    c.ema.unwrap_or(c.params)
                }
                None => model.table().initial_values(opts.seed),
            };
            Trainer::new(be, model, tc, &init, opts.seed).map_err(e)?
        }
    })
}

/// Writes the trainer's state as the checkpoint of its step (atomically), with the run's
/// settings, and prunes all but the newest `--keep`.
fn save_checkpoint<B: Backend>(
    be: &B,
    trainer: &Trainer<B>,
    config: ModelConfig,
    opts: &TrainOptions,
    len: usize,
) -> Result<(), String> {
    let state = trainer.state(be).map_err(|e| e.to_string())?;
    let run: BTreeMap<String, String> = [
        ("seed", opts.seed.to_string()),
        ("objective", opts.objective.describe()),
        ("length", len.to_string()),
        ("batch", opts.batch.to_string()),
        ("accumulate", opts.accumulate.to_string()),
        ("lr", opts.lr.to_string()),
        ("warmup", opts.warmup.to_string()),
        ("data", opts.data.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let ckpt = Checkpoint {
        config,
        params: state.params,
        ema: state.ema,
        moments: state.moments,
        step: state.step,
        run,
    };
    checkpoint::save(&checkpoint::path_for(&opts.out, trainer.step), &ckpt)?;
    checkpoint::prune(&opts.out, opts.keep);
    Ok(())
}

/// The mean loss over `--valid-batches` fixed windows of the validation shard, or `None`
/// without one (or with one shorter than a sequence).
fn validation_loss<B: Backend>(
    be: &B,
    model: &Transformer,
    trainer: &mut Trainer<B>,
    valid: Option<&Shard>,
    opts: &TrainOptions,
    len: usize,
    mask: u32,
) -> Result<Option<f64>, String> {
    let Some(v) = valid.filter(|v| v.len() >= len) else {
        return Ok(None);
    };
    let mut total = 0.0;
    for i in 0..opts.valid_batches {
        let x = windows(v, len, opts.batch, opts.seed ^ 0x5eed, i as u32);
        let b = make_batch(
            &opts.objective,
            &None,
            &x,
            opts.batch,
            len,
            mask,
            opts.seed ^ 0x5eed,
            0,
            i as u32,
        )?;
        total += trainer.evaluate(be, model, &b).map_err(|e| e.to_string())?;
    }
    Ok(Some(total / opts.valid_batches.max(1) as f64))
}

/// The step counter on the terminal (hidden without `--progress`).
fn progress_bar(opts: &TrainOptions) -> indicatif::ProgressBar {
    let bar = if opts.progress {
        indicatif::ProgressBar::new(u64::from(opts.steps))
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
    {
        bar.set_style(style);
    }
    bar
}
