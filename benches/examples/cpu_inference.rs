//! The figures of docs/perf/cpu-inference.md, from one run on this machine: DRAM read bandwidth
//! (the floor's denominator), then for the `small` model (random weights) in each weight format
//! at batch 1 and 8: a KV-cached draft call against its memory floor, where its time goes, a
//! global refine call, and what they make of `4,L:0.25` at length 1024. Writes one JSON object;
//! `scripts/cpu-inference-bench.sh` adds the PyTorch anchor and renders the page.
//!
//! Run: `cargo run --release -p did-benches --example cpu_inference -- [--out FILE]
//!       [--prefix 512] [--length 1024] [--reps 15]`

use std::time::Instant;

use did_backend_cpu::ops::stored::Isa;
use did_backend_cpu::CpuBackend;
use did_benches::cpu_inference::{bytes_read, random_model, ModelCall, DRAFT_BLOCK};
use did_benches::profile::Profiled;
use did_core::backend::prelude::*;
use did_core::backend::WeightFormat;
use rayon::prelude::*;
use serde_json::{json, Value};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Milliseconds of `f`, the median of `reps` after one warm-up.
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// The best of five reads of 1 GiB by every thread, in GB/s: what streaming weights can reach.
fn dram_read_gbs() -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0u64; 8];
                for x in c.chunks_exact(8) {
                    for l in 0..8 {
                        acc[l] = acc[l].wrapping_add(x[l]);
                    }
                }
                acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Where a batch-1 draft call's time goes, by op family (ms a call).
fn draft_breakdown(
    model: &did_core::model::Transformer,
    host: &[f32],
    format: WeightFormat,
    prefix: usize,
    len: usize,
) -> Result<Value, String> {
    let be = Profiled::new(CpuBackend::new());
    let params = be
        .upload_weights(host, &model.weight_matrices(), format)
        .map_err(|e| e.to_string())?;
    let mut call = ModelCall::draft(&be, model, &params, 1, prefix, len)?;
    be.reset();
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        call.run()?;
    }
    let total = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let mut groups = std::collections::BTreeMap::<&str, f64>::new();
    for (op, time) in be.times() {
        let group = if op.starts_with("matmul") || op.starts_with("linear") {
            "linear layers"
        } else if op.starts_with("draw") {
            "draw over the vocabulary"
        } else if op.starts_with("attention") || op.starts_with("rope") {
            "attention and rotary"
        } else if op.starts_with("layernorm") || op.starts_with("modulate") {
            "layernorm and modulation"
        } else {
            "other ops (embedding, bias, copies)"
        };
        *groups.entry(group).or_default() += time.time.as_secs_f64() * 1e3 / reps as f64;
    }
    let ops: f64 = groups.values().sum();
    groups.insert("between ops (host)", total - ops);
    Ok(json!(groups))
}

fn main() -> Result<(), String> {
    let out = arg("--out", "cpu-inference.json");
    let prefix: usize = arg("--prefix", "512")
        .parse()
        .map_err(|e| format!("--prefix: {e}"))?;
    let len: usize = arg("--length", "1024")
        .parse()
        .map_err(|e| format!("--length: {e}"))?;
    let reps: usize = arg("--reps", "15")
        .parse()
        .map_err(|e| format!("--reps: {e}"))?;
    let gbs = dram_read_gbs();
    eprintln!("DRAM read: {gbs:.1} GB/s");
    let (model, host) = random_model("small", 1)?;
    let be = CpuBackend::new();
    let params = WeightFormat::ALL
        .iter()
        .map(|&f| be.upload_weights(&host, &model.weight_matrices(), f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut rows: Vec<serde_json::Map<String, Value>> = vec![serde_json::Map::new(); 3];
    for batch in [1usize, 8] {
        // The formats' calls take turns, round after round: the VM's neighbours slow whatever
        // runs while they are busy, and so slow every format alike.
        let mut drafts = params
            .iter()
            .map(|p| ModelCall::draft(&be, &model, p, batch, prefix, len))
            .collect::<Result<Vec<_>, _>>()?;
        let mut times = vec![Vec::new(); drafts.len()];
        for round in 0..=reps {
            for (call, t) in drafts.iter_mut().zip(&mut times) {
                let start = Instant::now();
                call.run()?;
                if round > 0 {
                    t.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        drop(drafts);
        for (f, (format, t)) in WeightFormat::ALL.iter().zip(times).enumerate() {
            let draft_ms = median(t);
            let bytes = bytes_read(&model, *format, batch, prefix + DRAFT_BLOCK);
            let floor_ms = bytes as f64 / (gbs * 1e9) * 1e3;
            let mut refine = ModelCall::refine(&be, &model, &params[f], batch, len)?;
            let refine_ms = time_ms(if batch == 1 { 3 } else { 1 }, || refine.run())?;
            // First-hitting reveals one token a call: len − 1 draft calls, a commit a block
            // (about a draft call: the same rows, no head), then a quarter of the tokens again
            // with global calls.
            let calls_s = ((len - 1) as f64 * draft_ms
                + (len / DRAFT_BLOCK) as f64 * draft_ms
                + (len / 4) as f64 * refine_ms)
                / 1e3;
            eprintln!(
                "{format} batch {batch}: draft {draft_ms:.2} ms (floor {floor_ms:.2}, {:.2}×), refine {refine_ms:.0} ms",
                draft_ms / floor_ms
            );
            rows[f].insert(
                batch.to_string(),
                json!({
                    "draft_ms": draft_ms,
                    "bytes_read": bytes,
                    "floor_ms": floor_ms,
                    "draft_over_floor": draft_ms / floor_ms,
                    "refine_ms": refine_ms,
                    "samples_per_s_estimated": batch as f64 / calls_s,
                }),
            );
        }
    }
    let mut formats = Vec::new();
    for ((format, p), batches) in WeightFormat::ALL.iter().zip(&params).zip(rows) {
        formats.push(json!({
            "format": format.name(),
            "weight_bytes": p.bytes(),
            "batches": batches,
            "draft_breakdown_batch_1_ms": draft_breakdown(&model, &host, *format, prefix, len)?,
        }));
    }
    let report = json!({
        "machine": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())),
        "threads": rayon::current_num_threads(),
        "isa": Isa::detect().name(),
        "dram_read_gbs": gbs,
        "model": "small (12 × 768, vocabulary 50,258; random weights)",
        "prefix": prefix,
        "length": len,
        "rounds": reps,
        "formats": formats,
    });
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{out}: {e}"))?;
    eprintln!("wrote {out}");
    Ok(())
}
