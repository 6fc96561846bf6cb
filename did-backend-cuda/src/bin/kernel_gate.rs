//! The compile gate: compiles every kernel exactly as the backend does at run
//! time (NVRTC, both precisions) for one architecture, assembles each with
//! `ptxas -v`, fails on any error, and writes the registers, shared memory and
//! spills of every kernel to a markdown table. Needs NVRTC and ptxas, no GPU.
//!
//! `kernel-gate --ptxas PATH [--arch 90] [--out docs/gpu/kernels.md] [--keep DIR]`
//! (`scripts/kernel-gate.sh` installs the pinned NVRTC and ptxas and runs it; `--keep` leaves
//! the cubins in DIR, as `scripts/sass.sh` does to print their machine code).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use did_backend_cuda::kernels::{compile, SOURCES};
use did_backend_cuda::Precision;

struct Row {
    precision: &'static str,
    file: &'static str,
    kernel: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Reads `ptxas -v` output: "Compiling entry function 'X'", then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads" and
/// "Used N registers, … N bytes smem".
fn parse(log: &str, precision: &'static str, file: &'static str) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or("?").to_string();
            rows.push(Row {
                precision,
                file,
                kernel,
                registers: 0,
                smem: 0,
                stack: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(row) = rows.last_mut() {
            if line.contains("stack frame") {
                row.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                row.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                row.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                row.registers = number_before(line, "registers").unwrap_or(0);
                row.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    rows
}

fn run() -> Result<(), String> {
    let mut ptxas = None;
    let mut arch = "90".to_string();
    let mut out = PathBuf::from("docs/gpu/kernels.md");
    let mut keep: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--ptxas" => ptxas = Some(PathBuf::from(value()?)),
            "--arch" => arch = value()?,
            "--out" => out = PathBuf::from(value()?),
            "--keep" => keep = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}; usage: kernel-gate --ptxas PATH [--arch 90] [--out FILE] [--keep DIR]")),
        }
    }
    let ptxas = ptxas.ok_or("--ptxas PATH is required (scripts/kernel-gate.sh finds it)")?;
    let compute: &'static str = Box::leak(format!("compute_{arch}").into_boxed_str());
    let dir = std::env::temp_dir().join(format!("did-kernel-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some(k) = &keep {
        std::fs::create_dir_all(k).map_err(|e| format!("{}: {e}", k.display()))?;
    }
    let mut rows = Vec::new();
    for (precision, pname) in [(Precision::F32, "f32"), (Precision::Bf16, "bf16")] {
        for (file, source) in SOURCES {
            let ptx = compile(precision, file, source, compute).map_err(|e| e.to_string())?;
            let path = dir.join(format!("{pname}-{file}.ptx"));
            std::fs::write(&path, ptx.to_src()).map_err(|e| format!("{}: {e}", path.display()))?;
            // With --keep, every cubin stays (for cuobjdump -sass: scripts/sass.sh).
            let cubin = match &keep {
                Some(k) => k.join(format!("{pname}-{}.cubin", file.trim_end_matches(".cu"))),
                None => dir.join("out.cubin"),
            };
            let output = Command::new(&ptxas)
                .args([format!("-arch=sm_{arch}").as_str(), "-v", "-o"])
                .arg(&cubin)
                .arg(&path)
                .output()
                .map_err(|e| format!("could not run {}: {e}", ptxas.display()))?;
            let log = String::from_utf8_lossy(&output.stderr).into_owned()
                + &String::from_utf8_lossy(&output.stdout);
            if !output.status.success() {
                return Err(format!("ptxas rejected {file} ({pname}):\n{log}"));
            }
            let found = parse(&log, pname, file);
            if found.is_empty() {
                return Err(format!(
                    "ptxas -v printed no kernel for {file} ({pname}):\n{log}"
                ));
            }
            rows.extend(found);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let spills: Vec<&Row> = rows
        .iter()
        .filter(|r| r.spill_stores + r.spill_loads > 0)
        .collect();
    let mut md = format!(
        "# Kernels: registers, shared memory, spills (sm_{arch})\n\n\
         Written by `scripts/kernel-gate.sh` (the CI compile gate): every kernel compiled by NVRTC exactly as \
         the backend does at run time, in both storage precisions, then assembled by `ptxas -arch=sm_{arch} -v`. \
         {} kernels, {} with spills.\n\n\
         | precision | source | kernel | registers | static smem (bytes) | stack (bytes) | spill stores | spill loads |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n",
        rows.len(),
        spills.len()
    );
    for r in &rows {
        md += &format!(
            "| {} | {} | `{}` | {} | {} | {} | {} | {} |\n",
            r.precision,
            r.file,
            r.kernel,
            r.registers,
            r.smem,
            r.stack,
            r.spill_stores,
            r.spill_loads
        );
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&out, md).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "kernel gate: {} kernels compiled and assembled for sm_{arch} ({} with spills); table in {}",
        rows.len(),
        spills.len(),
        out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kernel gate failed: {e}");
            ExitCode::FAILURE
        }
    }
}
