//! The training run around did-core's `Trainer`: data windows from the token shards, the
//! objective's batches, a progress bar, a JSONL metrics log, validation, crash-safe checkpoints
//! and exact resume (`did train`, and the demo's training from scratch).
//!
//! - [`windows`]: what a step reads, and the batches built from it;
//! - [`metrics`]: `metrics.jsonl`, cut back to the checkpoint on resume.

pub mod metrics;
pub mod windows;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use did_core::backend::Backend;
use did_core::collective::{Collective, SingleProcess};
use did_core::model::{
    Architecture, BlockSizeDistribution, ModelConfig, TrainBatch, Trainer, TrainerConfig,
    TrainingState, Transformer,
};

use crate::checkpoint::{self, Checkpoint};
use crate::data::shard::Shard;
use crate::Error;
use metrics::MetricsLog;
use windows::{windows, BatchMaker};

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
    ///
    /// ```
    /// use did_engine::training::Objective;
    /// assert_eq!(Objective::parse("bd3", 4, "").unwrap(), Objective::Bd3(4));
    /// assert_eq!(Objective::parse("mix-scale", 4, "4:0.9,L:0.1").unwrap().describe(), "mix-scale:4:0.9,L:0.1");
    /// assert!(Objective::parse("gan", 4, "").is_err());
    /// ```
    pub fn parse(name: &str, block: usize, blocks: &str) -> Result<Self, Error> {
        match name {
            "bd3" => Ok(Objective::Bd3(block)),
            "mix-scale" => Ok(Objective::MixScale(
                blocks
                    .parse()
                    .map_err(|e| Error::Training(format!("--blocks: {e}")))?,
            )),
            "mdlm" => Ok(Objective::Mdlm),
            "ar" => Ok(Objective::Ar),
            other => Err(Error::Training(format!(
                "unknown objective {other:?}; use bd3, mix-scale, mdlm or ar"
            ))),
        }
    }

    /// The objective as a run's checkpoints record it: `bd3:4`, `mix-scale:4:0.9,L:0.1`, …
    pub fn describe(&self) -> String {
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
    /// Asked after every step; `true` saves a checkpoint and stops (the CLI's Ctrl-C).
    pub stop: fn() -> bool,
    /// Fault injection for the reliability tests: a NaN enters the loss at this optimizer step.
    pub fault_nan_at_step: Option<u32>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// The architecture trained.
    pub architecture: Architecture,
    /// Its parameter count.
    pub parameters: usize,
    /// The objective, as [`Objective::describe`] gives it.
    pub objective: String,
    /// Steps this run took.
    pub steps_run: u32,
    /// The step the run is at now (and its last checkpoint's).
    pub step: u32,
    /// Wall time.
    pub seconds: f64,
    /// The last step's training loss.
    pub last_loss: f64,
    /// The last validation loss, if there is a validation shard.
    pub valid_loss: Option<f64>,
    /// The output folder.
    pub out: PathBuf,
}

impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trained {} ({} parameters) with {} for {} steps (now at step {}) in {:.1} s\nlast loss {:.4}{}\ncheckpoints and metrics.jsonl in {}\n",
            self.architecture,
            self.parameters,
            self.objective,
            self.steps_run,
            self.step,
            self.seconds,
            self.last_loss,
            self.valid_loss
                .map(|v| format!(", validation loss {v:.4} (perplexity bound {:.2})", v.exp()))
                .unwrap_or_default(),
            self.out.display()
        )
    }
}

/// The model a run trains: a preset (taking the data's vocabulary, `[MASK]` last) or a TOML
/// file, checked against the data and the objective.
fn resolve_config(opts: &TrainOptions, vocab: u32) -> Result<ModelConfig, Error> {
    let bad = Error::Training;
    let arch = if opts.objective == Objective::Ar {
        Architecture::Gpt2
    } else {
        Architecture::Dit
    };
    let config = if opts.model == "tiny" || opts.model == "small" {
        let mut c = ModelConfig::preset(&opts.model, arch).map_err(|e| bad(e.to_string()))?;
        c.vocab_size = vocab as usize;
        c.mask_id = vocab - 1;
        c
    } else {
        let text = std::fs::read_to_string(&opts.model).map_err(|e| {
            bad(format!("cannot read the model config {:?}: {e}; name a preset (tiny, small) or a TOML file", opts.model))
        })?;
        crate::model_config::from_toml(&text)?
    };
    if config.vocab_size != vocab as usize {
        return Err(bad(format!(
            "vocabulary mismatch: the model has {} tokens, the data {vocab}; prepare the data with the model's tokenizer or set vocab_size",
            config.vocab_size
        )));
    }
    if (opts.objective == Objective::Ar) != (config.architecture == Architecture::Gpt2) {
        return Err(bad("the ar objective trains the gpt2 architecture and the diffusion objectives the dit; fix `architecture` or --objective".into()));
    }
    if let Some(l) = opts.length {
        if l > config.context {
            return Err(bad(format!(
                "--length {l} exceeds the model's context of {}",
                config.context
            )));
        }
    }
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

/// The batch maker of a run, after checking the lengths and counts it is given.
fn batch_maker(
    opts: &TrainOptions,
    config: &ModelConfig,
    shard: &Shard,
) -> Result<BatchMaker, Error> {
    let bad = Error::Training;
    let len = opts.length.unwrap_or(config.context);
    if shard.len() < len {
        return Err(bad(format!("the training shard has {} tokens, fewer than one sequence of {len}; use more data or a shorter --length", shard.len())));
    }
    if opts.batch == 0 || opts.accumulate == 0 || opts.steps == 0 {
        return Err(bad(
            "--batch, --accumulate and --steps must be at least 1".into()
        ));
    }
    let blocks = match &opts.objective {
        Objective::MixScale(d) => Some(d.resolve(len).map_err(|e| bad(format!("--blocks: {e}")))?),
        Objective::Bd3(b) if *b == 0 || len % b != 0 => {
            return Err(bad(format!("--block {b} must divide the length {len}")))
        }
        _ => None,
    };
    Ok(BatchMaker {
        objective: opts.objective.clone(),
        blocks,
        batch: opts.batch,
        len,
        mask: config.mask_id,
        seed: opts.seed,
    })
}

/// Runs training to `opts.steps` (or until `opts.stop` or `opts.max_seconds`), checkpointing as
/// it goes.
pub fn train<B: Backend>(be: &B, opts: &TrainOptions) -> Result<TrainSummary, Error> {
    train_with(be, opts, &mut SingleProcess)
}

/// [`train`] as one rank of a data-parallel world (docs/training.md): this rank's share of every
/// step's batch, gradients summed over `comm`; rank 0 alone writes checkpoints and
/// `metrics.jsonl`, validates and shows progress; the ranks compare checksums of their weights at
/// every checkpoint, and stop together when any of them is asked to.
pub fn train_with<B: Backend, C: Collective<B>>(
    be: &B,
    opts: &TrainOptions,
    comm: &mut C,
) -> Result<TrainSummary, Error> {
    let place = comm.place();
    let leader = place.rank == 0;
    let open = |name: &str| Shard::open(&opts.data.join(format!("{name}.bin")));
    let train_shard = open("train")?;
    let valid_shard = open("valid").ok().filter(|s| !s.is_empty());
    let config = resolve_config(opts, train_shard.header().vocab_size)?;
    let batches = batch_maker(opts, &config, &train_shard)?;
    let len = batches.len;
    let model = Transformer::new(config).map_err(|e| Error::Training(e.to_string()))?;
    let failed = |e: did_core::model::ModelError<B::Error>| Error::Training(e.to_string());
    let mut trainer = start_ranks(be, &model, opts, comm)?;
    let mut metrics = match leader {
        true => Some(MetricsLog::resume_at(&opts.out, trainer.step)?),
        false => None,
    };
    let bar = progress_bar(opts, leader);
    bar.set_position(u64::from(trainer.step));
    let mut last_loss = f64::NAN;
    let mut last_valid = None;
    let validate = |trainer: &mut Trainer<B>| {
        validation_loss(
            be,
            &model,
            trainer,
            valid_shard.as_ref(),
            &batches,
            opts.valid_batches,
        )
    };
    let clock = Instant::now();
    let first_step = trainer.step;
    let out_of_time = || {
        (opts.stop)()
            || opts
                .max_seconds
                .is_some_and(|s| clock.elapsed().as_secs_f64() >= s)
    };
    // Any rank that is asked to stop stops them all, after the same step.
    let mut stopping = any(comm, out_of_time())?;
    while trainer.step < opts.steps && !stopping {
        let step = trainer.step;
        let t0 = Instant::now();
        let mut micro: Vec<TrainBatch> = (0..opts.accumulate)
            .map(|m| {
                let ms = place.micro_step(step, opts.accumulate, m);
                let x = windows(&train_shard, len, opts.batch, opts.seed, ms);
                batches.make(&x, step, ms)
            })
            .collect::<Result<_, _>>()?;
        if opts.fault_nan_at_step == Some(step + 1) {
            // A NaN in the loss weights, to test the non-finite guard.
            micro[0].weights[0] = f32::NAN;
        }
        let report = trainer
            .step_with(be, &model, &micro, comm)
            .map_err(failed)?;
        let tokens = opts.batch * opts.accumulate * place.world * len;
        let tokens_per_s = tokens as f64 / t0.elapsed().as_secs_f64();
        last_loss = report.loss;
        stopping = any(comm, out_of_time())?;
        let save = report.step % opts.checkpoint_every.max(1) == 0
            || report.step == opts.steps
            || stopping;
        if save && place.world > 1 {
            trainer.check_replicas(be, comm).map_err(failed)?;
        }
        let Some(metrics) = metrics.as_mut() else {
            continue;
        };
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
        metrics.append(&line)?;
        bar.set_position(u64::from(report.step));
        bar.set_message(format!("loss {:.4} {:.0} tok/s", report.loss, tokens_per_s));
        if save {
            save_checkpoint(be, &trainer, config, opts, len)?;
        }
    }
    bar.finish_and_clear();
    if leader && last_valid.is_none() {
        last_valid = validate(&mut trainer)?;
    }
    if (opts.stop)() {
        return Err(Error::Interrupted(format!(
            "interrupted: saved step {} in {}; continue with the same command and --resume",
            trainer.step,
            opts.out.display()
        )));
    }
    Ok(TrainSummary {
        architecture: config.architecture,
        parameters: model.table().total(),
        objective: opts.objective.describe(),
        steps_run: trainer.step - first_step,
        step: trainer.step,
        seconds: clock.elapsed().as_secs_f64(),
        last_loss,
        valid_loss: last_valid,
        out: opts.out.clone(),
    })
}

/// Every rank's trainer at rank 0's state: rank 0 resumes, fine-tunes or starts fresh (creating
/// the output folder), the others start fresh and take its weights, moments, EMA and step. A rank
/// that cannot start stops every rank.
fn start_ranks<B: Backend, C: Collective<B>>(
    be: &B,
    model: &Transformer,
    opts: &TrainOptions,
    comm: &mut C,
) -> Result<Trainer<B>, Error> {
    let failed = |e: did_core::model::ModelError<B::Error>| Error::Training(e.to_string());
    let leader = comm.place().rank == 0;
    let tc = TrainerConfig {
        lr: opts.lr,
        warmup_steps: opts.warmup,
        ..TrainerConfig::default()
    };
    let started = if leader {
        std::fs::create_dir_all(&opts.out)
            .map_err(|e| {
                Error::Training(format!(
                    "cannot create the output folder {}: {e}; choose a writable --out",
                    opts.out.display()
                ))
            })
            .and_then(|()| start_trainer(be, model, tc, opts))
    } else {
        let init = model.table().initial_values(opts.seed);
        Trainer::new(be, model, tc, &init, opts.seed).map_err(failed)
    };
    let mut trainer = agree(comm, started, "start")?;
    let mut step = [f64::from(if leader { trainer.step } else { 0 })];
    comm.all_reduce_host(&mut step)
        .map_err(|e| Error::Training(e.to_string()))?;
    trainer.step = step[0] as u32;
    trainer.broadcast_from(be, comm, 0).map_err(failed)?;
    Ok(trainer)
}

/// `mine` if every rank's start succeeded; otherwise an error on every rank (its own, or one
/// that names the ranks that failed).
fn agree<B: Backend, C: Collective<B>, T>(
    comm: &mut C,
    mine: Result<T, Error>,
    what: &str,
) -> Result<T, Error> {
    let place = comm.place();
    let mut failed = vec![0.0; place.world];
    failed[place.rank] = f64::from(u8::from(mine.is_err()));
    comm.all_reduce_host(&mut failed)
        .map_err(|e| Error::Training(e.to_string()))?;
    let ranks: Vec<usize> = (0..place.world).filter(|&r| failed[r] > 0.0).collect();
    match mine {
        Err(e) => Err(e),
        Ok(_) if !ranks.is_empty() => Err(Error::Training(format!(
            "rank(s) {ranks:?} could not {what}; their own errors say why"
        ))),
        Ok(v) => Ok(v),
    }
}

/// Whether any rank says `yes`.
fn any<B: Backend, C: Collective<B>>(comm: &mut C, yes: bool) -> Result<bool, Error> {
    let mut votes = [f64::from(u8::from(yes))];
    comm.all_reduce_host(&mut votes)
        .map_err(|e| Error::Training(e.to_string()))?;
    Ok(votes[0] > 0.0)
}

/// The trainer a run starts from: its latest checkpoint (`--resume`), another run's weights
/// (`--init-from`, a fine-tune), or fresh initial values. Refuses to overwrite a run's
/// checkpoints or to resume into another model.
fn start_trainer<B: Backend>(
    be: &B,
    model: &Transformer,
    tc: TrainerConfig,
    opts: &TrainOptions,
) -> Result<Trainer<B>, Error> {
    let bad = Error::Training;
    let config = model.config();
    let failed = |e: did_core::model::ModelError<B::Error>| bad(e.to_string());
    let latest = checkpoint::list(&opts.out).pop();
    Ok(match (opts.resume, latest) {
        (true, Some((_, path))) => {
            let c = checkpoint::load(&path)?;
            if &c.config != config {
                return Err(bad(format!("{} holds another model configuration; resume with the same --model, or use a new --out", path.display())));
            }
            let state = TrainingState {
                params: c.params,
                ema: c.ema,
                moments: c.moments,
                step: c.step,
            };
            Trainer::resume(be, model, tc, &state, opts.seed).map_err(failed)?
        }
        (true, None) => {
            return Err(bad(format!(
                "--resume: no checkpoint in {}; start without --resume",
                opts.out.display()
            )))
        }
        (false, Some((_, path))) => {
            return Err(bad(format!(
            "{} already holds checkpoints ({}); pass --resume to continue, or choose a new --out",
            opts.out.display(),
            path.display()
        )))
        }
        (false, None) => {
            let init = match &opts.init_from {
                Some(p) => {
                    let c = checkpoint::load(p)?;
                    if &c.config != config {
                        return Err(bad(format!(
                            "--init-from {}: its model configuration differs from --model",
                            p.display()
                        )));
                    }
                    c.ema.unwrap_or(c.params)
                }
                None => model.table().initial_values(opts.seed),
            };
            Trainer::new(be, model, tc, &init, opts.seed).map_err(failed)?
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
) -> Result<(), Error> {
    let state = trainer
        .state(be)
        .map_err(|e| Error::Training(e.to_string()))?;
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

/// The mean loss over `valid_batches` fixed windows of the validation shard at the whole length
/// (no mix-scale draw), or `None` without one (or with one shorter than a sequence).
fn validation_loss<B: Backend>(
    be: &B,
    model: &Transformer,
    trainer: &mut Trainer<B>,
    valid: Option<&Shard>,
    batches: &BatchMaker,
    valid_batches: usize,
) -> Result<Option<f64>, Error> {
    let Some(v) = valid.filter(|v| v.len() >= batches.len) else {
        return Ok(None);
    };
    let seed = batches.seed ^ 0x5eed;
    let maker = BatchMaker {
        blocks: None,
        seed,
        ..batches.clone()
    };
    let mut total = 0.0;
    for i in 0..valid_batches {
        let x = windows(v, maker.len, maker.batch, seed, i as u32);
        let b = maker.make(&x, 0, i as u32)?;
        total += trainer
            .evaluate(be, model, &b)
            .map_err(|e| Error::Training(e.to_string()))?;
    }
    Ok(Some(total / valid_batches.max(1) as f64))
}

/// The step counter on the terminal (hidden without `progress`, and on every rank but 0).
fn progress_bar(opts: &TrainOptions, leader: bool) -> indicatif::ProgressBar {
    let bar = if opts.progress && leader {
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
