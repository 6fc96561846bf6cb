//! The command line of `did`, shared by the `did-cli` and `did` binaries.
//!
//! The commands (data, train, sample, eval, demo) come with the CLI issue.
//! Until then the binary checks a stage plan, which is the one user input
//! did-core already understands end to end.

use std::process::ExitCode;

use did_core::refine::StagePlan;

const USAGE: &str = "usage: did check-plan PLAN LENGTH
  PLAN    a stage plan such as 4,L:0.25 (draft with blocks of 4, remask 25%, refine globally)
  LENGTH  the sequence length the plan is for

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
