//! The command line of `did`, shared by the `did-cli` and `did` binaries.
//!
//! The commands (data, train, sample, eval, demo) come with the CLI issue.
//! Until then the binary checks a stage plan, which is the one user input
//! did-core already understands end to end.

pub mod model_config;

use std::process::ExitCode;

use did_core::refine::StagePlan;

const USAGE: &str = "usage: did check-plan PLAN LENGTH
       did model-info MODEL [--arch dit|gpt2] [--batch N] [--length L] [--block B]
  PLAN    a stage plan such as 4,L:0.25 (draft with blocks of 4, remask 25%, refine globally)
  LENGTH  the sequence length the plan is for
  MODEL   a preset (tiny, small) or a TOML file with a [model] table;
          prints the parameters and the memory of one training step

The data, train, sample, eval and demo commands are not built yet.";

/// Runs the command line on `args` (without the program name).
pub fn run(args: &[String]) -> ExitCode {
    match args {
        [cmd, plan, length] if cmd == "check-plan" => {
            let length: usize = match length.parse() {
                Ok(n) => n,
                Err(_) => {
                    eprintln!("error: LENGTH {length:?} is not a positive integer");
                    return ExitCode::from(2);
                }
            };
            match plan.parse::<StagePlan>().and_then(|p| p.resolve(length)) {
                Ok(resolved) => {
                    for (i, s) in resolved.stages().iter().enumerate() {
                        match s.remask_ratio {
                            None => println!("stage {}: draft with blocks of {}", i + 1, s.block_size),
                            Some(r) => println!(
                                "stage {}: remask {:.0}% of drawn tokens, regenerate with blocks of {}",
                                i + 1,
                                r * 100.0,
                                s.block_size
                            ),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        [cmd, rest @ ..] if cmd == "model-info" => match model_info(rest) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        [flag] if flag == "--version" || flag == "-V" => {
            println!("did {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// `did model-info`: the parameter count and the training memory of a model.
fn model_info(args: &[String]) -> Result<String, String> {
    use did_core::model::{memory_report, Architecture, ModelConfig, Pass};
    let (model, flags) = args
        .split_first()
        .ok_or("model-info needs a MODEL: a preset (tiny, small) or a TOML file")?;
    let mut arch = Architecture::Dit;
    let (mut batch, mut length, mut block) = (8usize, None, 4usize);
    let mut it = flags.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{flag} {value:?} is not a positive integer"))
        };
        match flag.as_str() {
            "--arch" => arch = value.parse().map_err(|e| format!("{e}"))?,
            "--batch" => batch = number()?,
            "--length" => length = Some(number()?),
            "--block" => block = number()?,
            other => return Err(format!("unknown flag {other}; see `did --help`")),
        }
    }
    let config = if model == "tiny" || model == "small" {
        ModelConfig::preset(model, arch).map_err(|e| e.to_string())?
    } else {
        let text = std::fs::read_to_string(model).map_err(|e| format!("cannot read the model config {model:?}: {e}; name a preset (tiny, small) or a TOML file"))?;
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
    let m = memory_report(&config, batch, length, pass);
    let gib = |b: usize| b as f64 / f64::from(1u32 << 30);
    Ok(format!(
        "{arch} model: {layers} layers × {hidden} hidden, {heads} heads, context {ctx}, vocabulary {vocab}\n\
         parameters: {params}\n\
         training step, batch {batch} × length {length}, {pass:?} (f32):\n\
         \x20 parameters {p:.2} GiB, gradients {g:.2} GiB, AdamW moments + EMA {o:.2} GiB\n\
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
    ))
}
