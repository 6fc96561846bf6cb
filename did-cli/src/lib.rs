//! The command line of `did`, shared by the `did-cli` and `did` binaries: argument parsing,
//! progress and printing over did-engine (checkpoints, data, importers, judges) and the did-core
//! and backend crates.

// The library the commands run on (did-engine), under the names the commands use.
pub(crate) use did_engine::{checkpoint, data, import, model_config, train_config};

pub mod demo;
pub mod eval;
pub mod interrupt;
pub mod sample;
pub mod serve;
pub mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use did_core::model::{memory_report_on, Architecture, ModelConfig, Pass, StorageLayout};
use did_core::refine::{RemaskAmount, StagePlan};
use did_core::sample::BlockUpdate;

use data::prepare::{prepare, render, PrepareOptions};
use data::tokenizer::TokenizerKind;

/// Block discrete diffusion language models with draft → remask → refine sampling.
#[derive(Debug, Parser)]
#[command(name = "did", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// Where the model runs.
    #[arg(long, global = true, value_enum, default_value_t = BackendChoice::Cpu)]
    pub backend: BackendChoice,
    /// How the CUDA backend stores tensors: f32 (matches the CPU) or bf16 (f32 arithmetic, half the memory).
    #[arg(long, global = true, value_enum, default_value_t = PrecisionChoice::F32)]
    pub precision: PrecisionChoice,
    /// A CUDA switch, NAME=VALUE, repeatable: attention=flash|reference, draw=device|host,
    /// few-rows=on|off, key-split=auto|off|N, graphs=on|off, stats=1. Each wins over its
    /// DID_CUDA_* variable (DID_CUDA_ATTENTION, …); unset, the defaults the GPU checks passed with.
    #[arg(long = "cuda", global = true, value_name = "NAME=VALUE")]
    pub cuda: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

/// The compute backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The reference CPU backend.
    Cpu,
    /// An NVIDIA GPU (device 0), through CUDA 13 loaded at run time.
    Cuda,
}

/// The storage precision of the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionChoice {
    /// f32 storage and arithmetic: the same tokens as the CPU.
    F32,
    /// bf16 storage, f32 arithmetic.
    Bf16,
}

/// Runs `$body` with `$be` bound to the backend the user chose.
macro_rules! on_backend {
    ($cli:expr, $be:ident => $body:expr) => {
        on_backend!($cli, 0, $be => $body)
    };
    ($cli:expr, $device:expr, $be:ident => $body:expr) => {
        match ($cli.backend, $cli.precision) {
            (BackendChoice::Cpu, PrecisionChoice::F32) => {
                let $be = &did_backend_cpu::CpuBackend::new();
                $body
            }
            (BackendChoice::Cpu, PrecisionChoice::Bf16) => Err(
                "the CPU backend computes in f32; --precision bf16 needs --backend cuda"
                    .to_string(),
            ),
            (BackendChoice::Cuda, precision) => {
                let precision = match precision {
                    PrecisionChoice::F32 => did_backend_cuda::Precision::F32,
                    PrecisionChoice::Bf16 => did_backend_cuda::Precision::Bf16,
                };
                let options = cuda_options(&$cli.cuda, |name| std::env::var(name).ok())
                    .map_err(|e| format!("--backend cuda: {e}"))?;
                let $be = &did_backend_cuda::CudaBackend::with_options($device, precision, options)
                    .map_err(|e| format!("--backend cuda: {e}"))?;
                $body
            }
        }
    };
}

/// The CUDA backend's options from `--cuda NAME=VALUE` flags, then the `DID_CUDA_*` variables
/// that `env` reads (a flag wins over its variable).
fn cuda_options(
    flags: &[String],
    env: impl Fn(&str) -> Option<String>,
) -> Result<did_backend_cuda::CudaOptions, String> {
    const NAMES: [&str; 6] = [
        "attention",
        "draw",
        "few-rows",
        "key-split",
        "graphs",
        "stats",
    ];
    let mut set = Vec::new();
    for flag in flags {
        let Some((name, value)) = flag.split_once('=') else {
            return Err(format!(
                "--cuda {flag}: give NAME=VALUE, e.g. --cuda attention=reference"
            ));
        };
        let name = name.trim().replace('_', "-");
        if !NAMES.contains(&name.as_str()) {
            return Err(format!(
                "--cuda {flag}: unknown switch `{name}`; the switches are {}",
                NAMES.join(", ")
            ));
        }
        let var = format!("DID_CUDA_{}", name.replace('-', "_").to_uppercase());
        set.push((var, value.trim().to_string()));
    }
    did_backend_cuda::CudaOptions::from_vars(|var| {
        set.iter()
            .rev()
            .find(|(v, _)| v == var)
            .map(|(_, value)| value.clone())
            .or_else(|| env(var))
    })
    .map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare a corpus: tokenise text files, folders and .tgz archives into token shards.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a model on prepared shards (see `did data prepare`), with crash-safe checkpoints.
    ///
    /// Example: did train --data data/prepared --model tiny --objective mix-scale --steps 1000 --out runs/tiny
    Train {
        /// A run file: a [train] table with any of these flags as keys (flags given here win) and
        /// optionally the [model] table (used unless --model is given).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Folder with train.bin and valid.bin.
        #[arg(long, default_value = "data/prepared")]
        data: PathBuf,
        /// `tiny`, `small` (with the data's vocabulary), or a TOML file with a [model] table.
        #[arg(long, default_value = "tiny")]
        model: String,
        /// bd3 (one block size), mix-scale (a distribution), mdlm (block = length) or ar (causal, gpt2).
        #[arg(long, default_value = "bd3")]
        objective: String,
        /// Block size of the bd3 objective.
        #[arg(long, default_value_t = 4)]
        block: usize,
        /// Block sizes of mix-scale, `size:probability,…` (`L` is the length).
        #[arg(long, default_value = "4:0.9,L:0.1")]
        blocks: String,
        /// Sequence length (default: the model's context).
        #[arg(long)]
        length: Option<usize>,
        /// Sequences per micro-batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Micro-batches per optimizer step.
        #[arg(long, default_value_t = 1)]
        accumulate: usize,
        /// Total optimizer steps (a resumed run continues up to this).
        #[arg(long, default_value_t = 1000)]
        steps: u32,
        /// Peak learning rate (linear warm-up, then constant).
        #[arg(long, default_value_t = 3e-4)]
        lr: f32,
        /// Warm-up steps.
        #[arg(long, default_value_t = 2500)]
        warmup: u32,
        /// Seed of every random stream (data order, noise, dropout, initialisation).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output folder for checkpoints and metrics.jsonl.
        #[arg(long, default_value = "runs/latest")]
        out: PathBuf,
        /// Save a checkpoint every N steps (and at the end).
        #[arg(long, default_value_t = 100)]
        checkpoint_every: u32,
        /// Checkpoints kept.
        #[arg(long, default_value_t = 3)]
        keep: usize,
        /// Validation every N steps (0: only at the end).
        #[arg(long, default_value_t = 0)]
        valid_every: u32,
        /// Micro-batches per validation.
        #[arg(long, default_value_t = 4)]
        valid_batches: usize,
        /// Continue from the newest checkpoint in --out, exactly.
        #[arg(long)]
        resume: bool,
        /// Start from the (EMA) weights of a checkpoint: fine-tuning.
        #[arg(long)]
        init_from: Option<PathBuf>,
        /// Start N local ranks, one process each (rank r on GPU r with --backend cuda): data
        /// parallel, a global batch of N × --batch × --accumulate. Launched by torchrun or srun
        /// instead, `did train` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (or
        /// SLURM's) and needs no flag.
        #[arg(long, visible_alias = "ranks", value_name = "N")]
        gpus: Option<usize>,
        /// Seconds a rank waits for the others (the rendezvous, each gradient sum) before it
        /// names the missing rank and stops.
        #[arg(long, default_value_t = 600.0)]
        rank_timeout: f64,
    },
    /// Sample from a checkpoint: draft, remask the least confident tokens, refine.
    ///
    /// Example: did sample --checkpoint runs/tiny/ckpt-00001000.safetensors --stages 4,L:0.25 --show-diff
    Sample {
        /// A `did train` checkpoint of a diffusion (dit) model.
        #[arg(long)]
        checkpoint: PathBuf,
        #[command(flatten)]
        sampling: sample::SamplingArgs,
        /// Also write one JSON line per sample (tokens, text, draft text, remasked positions, NFE, time).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the draft with the remasked tokens marked, then the refined text.
        #[arg(long)]
        show_diff: bool,
    },
    /// Write a weights-only copy of a checkpoint (EMA weights, no optimizer state): for sampling,
    /// evaluation and sharing. An output ending in .gz is compressed (every command reads it).
    ///
    /// Example: did export --checkpoint runs/tiny/ckpt-00001000.safetensors --out tiny.safetensors.gz
    Export {
        /// A `did train` checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The file to write (`.safetensors`, or `.safetensors.gz` compressed).
        #[arg(long)]
        out: PathBuf,
        /// Keep the trained weights instead of the EMA weights.
        #[arg(long)]
        no_ema: bool,
    },
    /// Evaluate: NELBO perplexity of held-out data, generative perplexity under a judge, entropy.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Import a checkpoint trained elsewhere as a `did` checkpoint.
    #[command(subcommand)]
    Import(ImportCommand),
    /// The demo: sample the committed byte-level models (or train new ones with --from-scratch)
    /// draft-only and draft → snapshot remask → refine with the same seeds, scored by a causal judge.
    Demo {
        /// Train both models anew here instead of sampling from the committed ones (data/demo/).
        #[arg(long)]
        from_scratch: bool,
        /// With --from-scratch: the training budget in minutes (diffusion model 75 %, judge 25 %).
        #[arg(long, default_value_t = 4.0)]
        minutes: f64,
        /// Working folder of --from-scratch.
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Samples per method.
        #[arg(long, default_value_t = 16)]
        samples: usize,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How the diffusion model's weight matrices are stored while sampling: f32, bf16 or
        /// int8 (CPU only); docs/cpu-inference.md.
        #[arg(long, default_value = "f32")]
        weights: String,
    },
    /// Serve completions over HTTP with OpenAI's API: requests that share their settings are
    /// batched, and each gets the tokens it would get alone (docs/serving.md).
    ///
    /// Example: did serve --port 8080, then
    /// curl -s localhost:8080/v1/completions -d '{"prompt": "The ", "max_tokens": 40, "seed": 1}'
    Serve(serve::ServeArgs),
    /// Explain a stage plan such as 4,L:0.25 for a sequence length.
    CheckPlan {
        /// Stage plan: block sizes, each later one with its remask fraction (`4,L:0.25`).
        plan: String,
        /// The sequence length the plan is for.
        length: usize,
    },
    /// Parameters and training memory of a model: a preset (tiny, small), a TOML file with a [model] table, or a checkpoint.
    ModelInfo {
        /// `tiny`, `small`, a TOML file, or a checkpoint (`.safetensors`, `.safetensors.gz`).
        model: String,
        /// Architecture of a preset.
        #[arg(long, default_value = "dit")]
        arch: String,
        /// Sequences per batch.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
        /// Sequence length (default: the model's context).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        length: Option<u64>,
        /// Diffusion block size.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
        block: u64,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Tokenise a corpus into train/valid/test shards (split by whole documents).
    ///
    /// Example: did data prepare data/excerpt --out data/prepared
    Prepare {
        /// Text files, JSON-lines files (one document per line), folders (their .txt and .jsonl
        /// files) and .tgz/.tar.gz archives (their .txt files), read in place.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder for train.bin, valid.bin and test.bin.
        #[arg(long, default_value = "data/prepared")]
        out: PathBuf,
        /// `gpt2` (BPE, EOS 50256) or `bytes`.
        #[arg(long, default_value = "gpt2")]
        tokenizer: String,
        /// Fraction of documents held out for validation.
        #[arg(long, default_value_t = 0.05)]
        valid_fraction: f64,
        /// Fraction of documents held out for test.
        #[arg(long, default_value_t = 0.05)]
        test_fraction: f64,
        /// The text field of .jsonl inputs and the text column of .parquet inputs.
        #[arg(long, alias = "jsonl-field", default_value = "text")]
        text_field: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImportCommand {
    /// A Hugging Face GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or any GPT2LMHeadModel):
    /// the folder with config.json and model.safetensors. The result is a causal `did` model,
    /// e.g. the judge of `did eval gen-ppl`.
    ///
    /// Example: did import gpt2 ~/models/gpt2-large --out judges/gpt2-large.safetensors
    Gpt2 {
        /// The model folder.
        dir: PathBuf,
        /// The `did` checkpoint to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// A Hugging Face BD3-LM (kuleshov-group/bd3lm-owt-block_size4, 8, 16, the block-1024
    /// pre-train) or MDLM (kuleshov-group/mdlm-owt): the folder with config.json and
    /// model.safetensors or pytorch_model.bin. The result is a `dit` model for `did sample`
    /// and `did eval`.
    ///
    /// Example: did import bd3lm ~/models/bd3lm-owt-block_size4 --out bd3lm-4.safetensors
    #[command(alias = "mdlm")]
    Bd3lm {
        /// The model folder.
        dir: PathBuf,
        /// The `did` checkpoint to write.
        #[arg(long)]
        out: PathBuf,
        /// The [MASK] token id (default: the last id, 50257 for GPT-2's vocabulary; 103 for
        /// the LM1B models' BERT vocabulary).
        #[arg(long)]
        mask_id: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum EvalCommand {
    /// Perplexity bound (NELBO) of the valid or test split, at a block size, under the unclipped schedule.
    ///
    /// Example: did eval nelbo --checkpoint runs/tiny/ckpt-00001000.safetensors --block 4 --split test
    Nelbo(eval::NelboOptions),
    /// Generative perplexity: sample (or read samples) and score them with a causal judge.
    ///
    /// Example: did eval gen-ppl --checkpoint runs/tiny/ckpt-00001000.safetensors --judge runs/ar/ckpt-00001000.safetensors --num-samples 16 --batch 4
    GenPpl(eval::GenPplOptions),
    /// Per-word perplexity of the samples' text under a CMU Sphinx n-gram model (the second,
    /// independent judge: PocketSphinx's en-us trigram model, from scripts/fetch-judges.sh).
    /// Words are lowercased letters and apostrophes; each sample is one `<s> … </s>` sentence;
    /// OOV words are skipped and counted.
    ///
    /// Example: did eval word-ppl samples.jsonl --lm data/judges/en-us.lm.bin
    WordPpl {
        /// The JSONL file of `did sample --out`.
        samples: PathBuf,
        /// The model (CMU Sphinx binary trie format).
        #[arg(long)]
        lm: PathBuf,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Unigram entropy (nats) of the samples of a `did sample --out` file.
    Entropy {
        /// The JSONL file.
        samples: PathBuf,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Runs the command line on `args` (without the program name).
pub fn run(args: &[String]) -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches_from(std::iter::once("did".to_string()).chain(args.iter().cloned()))
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match execute(cli, &matches, args) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn execute(cli: Cli, matches: &clap::ArgMatches, args: &[String]) -> Result<String, String> {
    match cli.command {
        Command::CheckPlan { plan, length } => check_plan(&plan, length),
        Command::Serve(args) => {
            let options = args.options()?;
            let checkpoint = args.checkpoint()?;
            let server =
                match (cli.backend, cli.precision) {
                    (BackendChoice::Cpu, PrecisionChoice::F32) => did_serve::Server::start(
                        &checkpoint,
                        || Ok(did_backend_cpu::CpuBackend::new()),
                        &options,
                    )?,
                    (BackendChoice::Cpu, PrecisionChoice::Bf16) => return Err(
                        "the CPU backend computes in f32; --precision bf16 needs --backend cuda"
                            .into(),
                    ),
                    (BackendChoice::Cuda, precision) => {
                        let precision = match precision {
                            PrecisionChoice::F32 => did_backend_cuda::Precision::F32,
                            PrecisionChoice::Bf16 => did_backend_cuda::Precision::Bf16,
                        };
                        let cuda = cuda_options(&cli.cuda, |name| std::env::var(name).ok())
                            .map_err(|e| format!("--backend cuda: {e}"))?;
                        did_serve::Server::start(
                            &checkpoint,
                            move || {
                                did_backend_cuda::CudaBackend::with_options(0, precision, cuda)
                                    .map_err(|e| format!("--backend cuda: {e}"))
                            },
                            &options,
                        )?
                    }
                };
            serve::serve(server)
        }
        Command::Demo {
            from_scratch,
            minutes,
            out,
            samples,
            seed,
            weights,
        } => {
            if samples == 0 {
                return Err("--samples must be at least 1".into());
            }
            let weights = weights.parse().map_err(|e| format!("--weights: {e}"))?;
            on_backend!(cli, be => demo::demo(be, &demo::DemoOptions {
                minutes,
                out,
                samples,
                seed,
                from_scratch,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                weights,
            }))
        }
        Command::Sample {
            checkpoint,
            sampling,
            out,
            show_diff,
        } => on_backend!(cli, be => sample::sample(be, &sample::SampleOptions {
            checkpoint,
            sampling,
            out,
            show_diff,
            color: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        })),
        Command::Eval(EvalCommand::Nelbo(opts)) => on_backend!(cli, be => eval::nelbo(be, &opts)),
        Command::Eval(EvalCommand::GenPpl(opts)) => {
            on_backend!(cli, be => eval::gen_ppl(be, &opts))
        }
        Command::Eval(EvalCommand::Entropy { samples, json }) => eval::entropy(&samples, &json),
        Command::Eval(EvalCommand::WordPpl { samples, lm, json }) => {
            eval::word_ppl(&samples, &lm, &json)
        }
        Command::Import(ImportCommand::Gpt2 { dir, out }) => Ok(import::import_gpt2(&dir, &out)?),
        Command::Import(ImportCommand::Bd3lm { dir, out, mask_id }) => Ok(import::import_bd3lm(
            &dir,
            &out,
            import::Bd3lmOptions { mask_id },
        )?),
        Command::Export {
            checkpoint,
            out,
            no_ema,
        } => {
            let ckpt = checkpoint::load(&checkpoint)?;
            let slim = checkpoint::weights_only(&ckpt, no_ema);
            checkpoint::save(&out, &slim)?;
            let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            Ok(format!(
                "wrote {} ({} weights of step {}, {:.1} MB)\n",
                out.display(),
                slim.run.get("weights").map_or("trained", String::as_str),
                slim.step,
                bytes as f64 / 1e6
            ))
        }
        Command::Train {
            config,
            mut data,
            mut model,
            mut objective,
            mut block,
            mut blocks,
            mut length,
            mut batch,
            mut accumulate,
            mut steps,
            mut lr,
            mut warmup,
            mut seed,
            mut out,
            mut checkpoint_every,
            mut keep,
            mut valid_every,
            mut valid_batches,
            resume,
            mut init_from,
            gpus,
            rank_timeout,
        } => {
            let placement = did_engine::launch::Placement::from_vars(|k| std::env::var(k).ok())?;
            if let Some(n) = gpus {
                if placement.is_some() {
                    return Err("--gpus starts the ranks itself; under torchrun or srun (RANK/WORLD_SIZE or SLURM_NTASKS set) leave it out".into());
                }
                if cli.backend == BackendChoice::Cuda {
                    train::enough_gpus(n, did_backend_cuda::probe())?;
                }
                return train::launch_local(n, args);
            }
            if let Some(path) = &config {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the run config {}: {e}", path.display()))?;
                let (t, has_model) =
                    train_config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                // A flag typed on the command line wins over the file.
                let typed = |id: &str| {
                    matches
                        .subcommand_matches("train")
                        .and_then(|m| m.value_source(id))
                        == Some(ValueSource::CommandLine)
                };
                macro_rules! from_file {
                    ($($field:ident),*) => {$(
                        if !typed(stringify!($field)) {
                            if let Some(v) = t.$field.clone() {
                                $field = v;
                            }
                        }
                    )*};
                }
                from_file!(data, objective, block, blocks, batch, accumulate, steps, lr, warmup);
                from_file!(
                    seed,
                    out,
                    checkpoint_every,
                    keep,
                    valid_every,
                    valid_batches
                );
                if !typed("length") && t.length.is_some() {
                    length = t.length;
                }
                if !typed("init_from") && t.init_from.is_some() {
                    init_from = t.init_from.clone();
                }
                if has_model && !typed("model") {
                    model = path.display().to_string();
                }
            }
            let opts = train::TrainOptions {
                data,
                model,
                objective: train::Objective::parse(&objective, block, &blocks)?,
                length,
                batch,
                accumulate,
                steps,
                lr,
                warmup,
                seed,
                out,
                checkpoint_every,
                keep,
                valid_every,
                valid_batches,
                resume,
                init_from,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                max_seconds: None,
                stop: crate::interrupt::requested,
                fault_nan_at_step: train::fault_nan_at_step()?,
            };
            let timeout = std::time::Duration::from_secs_f64(rank_timeout.max(1.0));
            let device = placement.as_ref().map_or(0, |p| p.local_rank);
            on_backend!(cli, device, be => train::train_placed(be, &opts, placement.as_ref(), timeout))
        }
        Command::ModelInfo {
            model,
            arch,
            batch,
            length,
            block,
        } => model_info(
            cli.backend,
            cli.precision,
            &model,
            &arch,
            batch as usize,
            length.map(|l| l as usize),
            block as usize,
        ),
        Command::Data(DataCommand::Prepare {
            inputs,
            out,
            tokenizer,
            valid_fraction,
            test_fraction,
            text_field,
        }) => {
            let tokenizer: TokenizerKind = tokenizer.parse()?;
            let opts = PrepareOptions {
                inputs,
                out_dir: out.clone(),
                tokenizer,
                valid_fraction,
                test_fraction,
                text_field,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let summary = prepare(&opts)?;
            Ok(render(&summary, tokenizer, &out))
        }
    }
}

fn check_plan(plan: &str, length: usize) -> Result<String, String> {
    let resolved = plan
        .parse::<StagePlan>()
        .and_then(|p| p.resolve(length))
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    for (i, s) in resolved.stages().iter().enumerate() {
        let what = match s.remask {
            None => format!("stage {}: draft with blocks of {}", i + 1, s.block_size),
            Some(amount) => format!(
                "stage {}: remask {}, regenerate them with blocks of {}",
                i + 1,
                explain_remask(amount),
                s.block_size
            ),
        };
        let rule = match s.update {
            None => {
                "each block filled by the --sampler rule (first-hitting unless set)".to_string()
            }
            Some(u) => format!("each block filled by {}", explain_update(u)),
        };
        out.push_str(&format!(
            "{what};
    {rule}
"
        ));
    }
    Ok(out)
}

fn explain_remask(amount: RemaskAmount) -> String {
    match amount {
        RemaskAmount::Fraction(r) => format!(
            "the least confident {}% of the drawn tokens (a fixed count per sample)",
            r * 100.0
        ),
        RemaskAmount::Below { score, min, max } => format!(
            "every drawn token whose confidence is below {score}, but at least {}% and at most {}% of them (decided per sample)",
            min * 100.0,
            max * 100.0
        ),
    }
}

fn explain_update(update: BlockUpdate) -> String {
    match update {
        BlockUpdate::FirstHitting => "first-hitting: one uniformly chosen token per model call".into(),
        BlockUpdate::DdpmCaching { steps } => {
            format!("DDPM caching: {steps} steps per block, each position revealed at a random step")
        }
        BlockUpdate::ConfidenceThreshold { tau } => format!(
            "a confidence threshold: each call draws every masked position and keeps the draws surer than {tau} (at least the surest one)"
        ),
        BlockUpdate::EntropyBound { budget } => format!(
            "an entropy bound: each call draws every masked position and keeps the lowest-entropy draws while their entropies, less the largest, sum to at most {budget} nats"
        ),
        BlockUpdate::TopK { k } => format!(
            "{k} per call: each call draws every masked position and keeps the {k} surest"
        ),
    }
}

/// `did model-info`: the parameter count and the training memory of a model.
fn model_info(
    backend: BackendChoice,
    precision: PrecisionChoice,
    model: &str,
    arch: &str,
    batch: usize,
    length: Option<usize>,
    block: usize,
) -> Result<String, String> {
    let arch: Architecture = arch.parse().map_err(|e| format!("{e}"))?;
    let config = if model == "tiny" || model == "small" {
        ModelConfig::preset(model, arch).map_err(|e| e.to_string())?
    } else if model.ends_with(".safetensors") || model.ends_with(".safetensors.gz") {
        checkpoint::load(std::path::Path::new(model))?.config
    } else {
        let text = std::fs::read_to_string(model)
            .map_err(|e| format!("cannot read the model config {model:?}: {e}; name a preset (tiny, small), a TOML file or a checkpoint"))?;
        model_config::from_toml(&text)?
    };
    let length = length.unwrap_or(config.context);
    if length > config.context {
        return Err(format!(
            "--length {length} exceeds the model's context of {}",
            config.context
        ));
    }
    let pass = match config.architecture {
        Architecture::Gpt2 => Pass::Causal,
        Architecture::Dit => {
            if length % block != 0 {
                return Err(format!("--block {block} must divide the length {length}"));
            }
            Pass::diffusion(block, length)
        }
    };
    // The CUDA backend pads the logits rows (no device is needed to say how).
    let stride = match backend {
        BackendChoice::Cpu => config.vocab_size,
        BackendChoice::Cuda => config
            .vocab_size
            .next_multiple_of(did_backend_cuda::LOGITS_ROW_ALIGNMENT),
    };
    let (element_bytes, storage) = match (backend, precision) {
        (BackendChoice::Cuda, PrecisionChoice::Bf16) => (2, "bf16, f32 optimizer state"),
        _ => (4, "f32"),
    };
    let layout = StorageLayout {
        logits_stride: stride,
        element_bytes,
    };
    let m = memory_report_on(&config, batch, length, pass, layout);
    let rows = if stride == config.vocab_size {
        String::new()
    } else {
        format!(", logits rows padded to {stride}")
    };
    let gib = |b: usize| b as f64 / f64::from(1u32 << 30);
    Ok(format!(
        "{arch} model: {layers} layers × {hidden} hidden, {heads} heads, context {ctx}, vocabulary {vocab}\n\
         parameters: {params}\n\
         training step, batch {batch} × length {length}, {pass:?} ({storage}{rows}):\n\
         \x20 parameters {p:.2} GiB, gradients {g:.2} GiB, optimizer (AdamW moments, EMA{masters}) {o:.2} GiB\n\
         \x20 activations {a:.2} GiB (logits {l:.2} GiB), gradient scratch {s:.2} GiB\n\
         \x20 total {t:.2} GiB\n",
        arch = config.architecture,
        layers = config.layers,
        hidden = config.hidden,
        heads = config.heads,
        ctx = config.context,
        vocab = config.vocab_size,
        params = config.parameter_count(),
        p = gib(m.parameters),
        g = gib(m.gradients),
        o = gib(m.optimizer),
        a = gib(m.activations),
        l = gib(m.logits),
        s = gib(m.gradient_scratch),
        t = gib(m.total()),
        masters = if element_bytes < 4 {
            ", f32 masters, EMA copy"
        } else {
            ""
        },
    ))
}

#[cfg(test)]
mod cuda_flags {
    use super::cuda_options;
    use did_backend_cuda::{AttentionKernel, DrawLocation, KeySplit};

    #[test]
    fn flags_win_over_the_environment_and_bad_ones_name_the_fix() {
        let env = |name: &str| match name {
            "DID_CUDA_ATTENTION" => Some("flash".to_string()),
            "DID_CUDA_DRAW" => Some("host".to_string()),
            _ => None,
        };
        let flags = ["attention=reference".to_string(), "key_split=3".to_string()];
        let o = cuda_options(&flags, env).expect("valid flags");
        assert_eq!(o.attention, AttentionKernel::Reference); // the flag, not the variable
        assert_eq!(o.draw, DrawLocation::Host); // the variable
        assert_eq!(o.key_split, KeySplit::TilesPerBlock(3));
        for (flag, says) in [
            ("attention", "NAME=VALUE"),
            ("speed=fast", "unknown switch `speed`"),
            ("draw=gpu", "DID_CUDA_DRAW"),
        ] {
            let err = cuda_options(&[flag.to_string()], |_| None).unwrap_err();
            assert!(err.contains(says), "{flag}: {err}");
        }
    }
}
