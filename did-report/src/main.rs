//! `did-report --results runs/reproduce --out docs/results`: see the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Writes docs/results (README.md, results.json, plots) from the results of scripts/reproduce.sh.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The results folder of scripts/reproduce.sh.
    #[arg(long, default_value = "runs/reproduce")]
    results: PathBuf,
    /// Where the report goes (its discussion.md is included when present).
    #[arg(long, default_value = "docs/results")]
    out: PathBuf,
    /// The commit the results were made at.
    #[arg(long, default_value = "unknown")]
    commit: String,
    /// The machine they were made on.
    #[arg(long, default_value = "unknown")]
    machine: String,
    /// A plan sweep's results (scripts/adaptive-sweep.sh), with this page title.
    #[arg(long)]
    sweep: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings_path = args.results.join("settings.json");
    let settings = match std::fs::read_to_string(&settings_path) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {} is not JSON: {e}", settings_path.display());
                return ExitCode::FAILURE;
            }
        },
        Err(_) => serde_json::Value::Null,
    };
    let prov = did_report::Provenance {
        commit: args.commit,
        machine: args.machine,
        settings,
    };
    let written = match &args.sweep {
        Some(title) => did_report::write_sweep_report(&args.results, &args.out, &prov, title),
        None => did_report::write_report(&args.results, &args.out, &prov),
    };
    match written {
        Ok(r) => {
            println!(
                "{} experiments, {} NELBO rows, {} models → {}",
                r.experiments.len(),
                r.nelbo.len(),
                r.models.len(),
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
