#!/usr/bin/env bash
# did against the PyTorch baseline (benches/pytorch/) on the same GPU, in the same run:
#
#   scripts/gpu-bench.sh [BUNDLE] [OUT]        (defaults: target/gpu-bundle docs/perf)
#
# 0. checks the baseline computes did's logits (benches/pytorch/check_against_did.py);
# 1. the GPU's ceilings (a large bf16 GEMM, a large copy) with PyTorch;
# 2. did: `small` BD3 training steps (block 4, bf16) and draft → refine sampling (4,L:0.25) at
#    batch 1 and 64, each run under a time limit, device memory polled with nvidia-smi; a run
#    that fails on the default paths runs once more with the fast ones off (safe_paths), and
#    the report says so;
# 3. the PyTorch baseline: the same training step (eager SDPA and compiled FlexAttention) and
#    the same sampler (eager), also polled;
# 3b. did's per-op profile of a training step and of sampling (examples/profile_ops → OUT/gpu-profile.md),
#    shortened or skipped to end before BENCH_DEADLINE (epoch seconds) where one is given;
# 4. writes OUT/gpu.json (device, train_tokens_per_s, pytorch_train_tokens_per_s, train_mfu,
#    sample_per_s_b1, pytorch_sample_per_s_b1, sample_per_s_b64, pytorch_sample_per_s_b64,
#    peak_memory_bytes, and every raw figure) and the measured section of OUT/gpu.md.
#
# Settings (environment): DID_CUDA_ATTENTION (flash), DID_CUDA_DRAW (device), BACKEND (cuda), TORCH_DEVICE (cuda), PYTHON (python3), PRESET (small),
# LENGTH (the preset's context), BATCH (8), STEPS (8), SAMPLE_BATCHES ("1 64"; with the CUDA backend batch 1 runs
# again with DID_CUDA_GRAPHS=on unless GRAPHS_RUN=0, for GRAPHS_LIMIT = 30 s at most), TIME_LIMIT (150 s
# per sampling run), PRECISION (bf16), PT_TRAIN (eager-sdpa,eager-sdpa-masked,compile-flex), PT_SAMPLE (eager). With BACKEND=cpu
# TORCH_DEVICE=cpu PRECISION=f32 PRESET=tiny and small numbers it runs anywhere (a smoke test of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-target/gpu-bundle}
out=${2:-docs/perf}
did="$bundle/did"
backend=${BACKEND:-cuda}
tdev=${TORCH_DEVICE:-cuda}
py=${PYTHON:-python3}
preset=${PRESET:-small}
batch=${BATCH:-8}
steps=${STEPS:-8}
limit=${TIME_LIMIT:-150}
prec=${PRECISION:-bf16}
# did's attention: the flash kernels unless told otherwise (AttentionKernel in did-backend-cuda).
export DID_CUDA_ATTENTION=${DID_CUDA_ATTENTION:-flash}
# did's token draws: on the device unless told otherwise (DrawLocation in did-backend-cuda).
export DID_CUDA_DRAW=${DID_CUDA_DRAW:-device}
mkdir -p "$out"
work=$(mktemp -d)
# The log stays beside the results: a failed step names its cause there.
trap 'cp "$work/log" "$out/gpu-bench.log" 2>/dev/null; rm -rf "$work"' EXIT
length_flag=()
[ -n "${LENGTH:-}" ] && length_flag=(--length "$LENGTH")

# Peak device memory of one command: nvidia-smi polled every 100 ms, minus what was in use before.
poll_start() {
    if command -v nvidia-smi >/dev/null; then
        base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$work/mem" 2>/dev/null &
        poller=$!
    else
        base=""
    fi
}
poll_stop() { # → peak bytes above the baseline, or null
    if [ -n "$base" ]; then
        kill "$poller" 2>/dev/null
        wait "$poller" 2>/dev/null
        sort -n "$work/mem" | tail -n 1 | awk -v b="$base" '{ printf "%d", ($1 - b) * 1048576 }'
    else
        echo null
    fi
}

echo "== the baseline is the same model: its logits against did's CPU backend (demo checkpoint)"
if [ -x "$bundle/examples/reference_logits" ] && "$bundle/examples/reference_logits" data/demo/dit.safetensors.gz \
    "$work/reference.safetensors" >>"$work/log" 2>&1; then
    (cd benches/pytorch && $py check_against_did.py "$work/reference.safetensors" ../../data/demo/dit.safetensors.gz \
        --device "$tdev") 2>>"$work/log" | tee "$work/check.txt"
else
    echo "no reference logits (bundle without examples/reference_logits)" | tee "$work/check.txt"
fi

echo "== ceilings"
$py benches/pytorch/ceilings.py >"$work/ceilings.json" 2>>"$work/log" || echo '{"error": "ceilings.py failed"}' >"$work/ceilings.json"
cat "$work/ceilings.json"

# A run that fails on the default (fast) paths is run once more with them off, so a kernel that
# fails costs its own figure, not the training checkpoint every sampling run needs; the report
# names every run that needed it.
safe_paths=(DID_CUDA_ATTENTION=reference DID_CUDA_DRAW=host DID_CUDA_FEW_ROWS=off DID_CUDA_KEY_SPLIT=off)
train_fallback=""

echo "== did: data, training"
"$did" data prepare data/excerpt --out "$work/data" >>"$work/log" 2>&1
train() {
    "$did" --backend "$backend" --precision "$prec" train --data "$work/data" --model "$preset" "${length_flag[@]}" \
        --objective bd3 --block 4 --batch "$batch" --steps "$steps" --out "$work/train" >>"$work/log" 2>&1
}
poll_start
train
train_rc=$?
train_mem=$(poll_stop)
if [ "$train_rc" -ne 0 ] && [ "$backend" = cuda ]; then
    echo "training failed (exit status $train_rc): once more with ${safe_paths[*]}" | tee -a "$work/log"
    rm -rf "$work/train"
    train_fallback="${safe_paths[*]} (the default paths failed with exit status $train_rc)"
    poll_start
    (export "${safe_paths[@]}" && train)
    train_rc=$?
    train_mem=$(poll_stop)
fi
ckpt=$(ls "$work"/train/ckpt-*.safetensors 2>/dev/null | tail -n 1)

echo "== did: sampling"
# A run is a batch size; `Ng` is batch N with the draft's passes recorded as CUDA graphs
# (DID_CUDA_GRAPHS=on), timed beside the plain run.
runs=${SAMPLE_BATCHES:-1 64}
[ "$backend" = cuda ] && [ "${GRAPHS_RUN:-1}" = 1 ] && runs="$runs 1g"
# sample_run RUN BATCH GRAPHS LIMIT [FALLBACK]: one timed `did sample`, a row of sample-rows.jsonl.
sample_run() {
    local run=$1 b=$2 graphs=$3 run_limit=$4 fallback=${5:-} s rc mem wall
    poll_start
    s=$(date +%s.%N)
    # SIGINT at the limit: did stops between two model calls and says how far each stage got.
    DID_CUDA_GRAPHS=$graphs DID_CUDA_STATS=1 timeout -s INT -k 20 "$run_limit" "$did" --backend "$backend" --precision "$prec" sample --checkpoint "$ckpt" --stages 4,L:0.25 \
        "${length_flag[@]}" --num-samples "$b" --batch "$b" --seed 1 --out "$work/samples-$run.jsonl" \
        >>"$work/log" 2>"$work/sample-$run.err"
    rc=$?
    cat "$work/sample-$run.err" >>"$work/log"
    mem=$(poll_stop)
    wall=$(python3 -c "import time,sys; print(time.time() - float(sys.argv[1]))" "$s")
    echo "{\"run\": \"$run\", \"batch\": $b, \"graphs\": \"$graphs\", \"exit_status\": $rc, \"command_seconds\": $wall, \"peak_memory_bytes\": $mem, \"fallback\": \"$fallback\", \"jsonl\": \"$work/samples-$run.jsonl\"}" >>"$work/sample-rows.jsonl"
    echo "run $run (batch $b, graphs $graphs${fallback:+, fallback}): rc $rc, ${wall} s"
    return $rc
}
for run in $runs; do
    if [ -z "$ckpt" ]; then break; fi
    b=${run%g}
    graphs=off run_limit=$limit
    # The graph run is an extra: it gets less time (GRAPHS_LIMIT, 30 s).
    [ "$run" != "$b" ] && graphs=on run_limit=${GRAPHS_LIMIT:-30}
    sample_run "$run" "$b" "$graphs" "$run_limit"
    rc=$?
    # 124: stopped at the limit, which is a result; anything else but 0 is a failure.
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$backend" = cuda ]; then
        (export "${safe_paths[@]}" &&
            sample_run "$run-fallback" "$b" "$graphs" "$run_limit" "${safe_paths[*]} (the default paths failed with exit status $rc)")
    fi
done

echo "== PyTorch baseline"
poll_start
(cd benches/pytorch && $py bench.py --device "$tdev" --preset "$preset" ${LENGTH:+--length "$LENGTH"} --batch "$batch" \
    --steps "$steps" --train-variants "${PT_TRAIN:-eager-sdpa,eager-sdpa-masked,compile-flex}" --sample-variants "${PT_SAMPLE:-eager}" \
    --sample-batches "$(echo ${SAMPLE_BATCHES:-1 64} | tr ' ' ',')" --time-limit "$limit" --out "$work/pytorch.json") \
    2>>"$work/log"
pt_mem=$(poll_stop)
[ -s "$work/pytorch.json" ] || echo '{"train": [], "sample": []}' >"$work/pytorch.json"

# The profile last: where the caller's deadline (BENCH_DEADLINE, epoch seconds) is near, it is
# what gives way, never the baseline or the report.
echo "== did: where the time goes (per-op profile, every op synchronized)"
plimit=${PROFILE_LIMIT:-120}
if [ -n "${BENCH_DEADLINE:-}" ]; then
    left=$(( BENCH_DEADLINE - $(date +%s) - 15 ))
    [ "$left" -lt "$plimit" ] && plimit=$left
fi
if [ ! -x "$bundle/examples/profile_ops" ]; then
    echo "no profile (bundle without examples/profile_ops)"
elif [ "$plimit" -lt 20 ]; then
    echo "profile skipped: ${plimit} s left before the deadline" | tee -a "$work/log"
else
    BACKEND=$backend PRECISION=$prec PRESET=$preset BATCH=$batch STEPS=2 \
        SAMPLE_BATCHES="${SAMPLE_BATCHES:-1 64}" SAMPLE_LENGTH=${PROFILE_SAMPLE_LENGTH:-256} \
        timeout "$plimit" "$bundle/examples/profile_ops" "$out/gpu-profile.md" >>"$work/log" 2>&1 ||
        echo "profile_ops failed or ran out of time (see gpu-bench.log)"
fi

echo "== report"
python3 scripts/gpu-floors.py --json --batch "$batch" >"$work/floors.json"
python3 - "$work" "$out" "$backend" "$preset" "$train_rc" "$train_mem" "$pt_mem" "$limit" "${LENGTH:-}" "$train_fallback" <<'PY'
import json, os, statistics, subprocess, sys, datetime

work, out, backend, preset, train_rc, train_mem, pt_mem, limit, length, train_fallback = sys.argv[1:11]
load = lambda p: json.load(open(os.path.join(work, p)))  # noqa: E731
ceil, floors, pt = load("ceilings.json"), load("floors.json"), load("pytorch.json")
null = lambda s: None if s in ("", "null") else int(s)  # noqa: E731

def device():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except Exception:
        return "no NVIDIA GPU (smoke test)"

rows = [json.loads(l) for l in open(os.path.join(work, "train", "metrics.jsonl")) if '"tokens_per_s"' in l] \
    if os.path.exists(os.path.join(work, "train", "metrics.jsonl")) else []
ours_tps = statistics.median(r["tokens_per_s"] for r in (rows[1:] or rows)) if rows else None

def ours_rate(row):
    path = row["jsonl"]
    if row["exit_status"] != 0 or not os.path.exists(path):
        return None
    walls = [json.loads(l)["wall_s"] for l in open(path) if l.strip()]
    return 1.0 / statistics.mean(walls) if walls else None

def ours_stages(row):
    """Each stage's model calls and seconds (`did sample`'s batch_stages), from a finished run."""
    path = row["jsonl"]
    if not os.path.exists(path):
        return None
    lines = [json.loads(l) for l in open(path) if l.strip()]
    return lines[0].get("batch_stages") if lines else None

def backend_said(row):
    """What the CUDA backend printed when it was dropped (DID_CUDA_STATS=1)."""
    err = os.path.join(work, f"sample-{row['run']}.err")
    return [l.strip().split("): ", 1)[-1] for l in open(err) if l.startswith("did-backend-cuda")] if os.path.exists(err) else []

def backend_counts(row):
    """The CUDA backend's own counts (launches, graph replays and failed recordings, cuBLAS calls, transfers, draws)."""
    said = [l for l in backend_said(row) if "could not be recorded" not in l]
    return said[-1] if said else None

def recording_failure(row):
    """Why the first draft pass that could not be recorded as a CUDA graph failed, if one did."""
    said = [l for l in backend_said(row) if "could not be recorded" in l]
    return said[-1] if said else None

def cut_short(row):
    """did's own account of a run stopped at the time limit (stage by stage), or None."""
    err = os.path.join(work, f"sample-{row['run']}.err")
    said = [l.strip() for l in open(err) if "interrupted after" in l] if os.path.exists(err) else []
    return said[-1] if said else None

sample = [json.loads(l) for l in open(os.path.join(work, "sample-rows.jsonl"))] if os.path.exists(os.path.join(work, "sample-rows.jsonl")) else []
every_run = {r["run"]: {**r, "samples_per_s": ours_rate(r), "stages": ours_stages(r), "cut_short": cut_short(r),
                        "backend_counts": backend_counts(r), "recording_failure": recording_failure(r)}
             for r in sample}
for r in every_run.values():
    r.pop("jsonl", None)
# The plain runs by batch (the table's did column); the graph runs beside them.
ours_sample = {r["batch"]: r for r in every_run.values() if r.get("graphs") != "on"}
graph_runs = {r["batch"]: r for r in every_run.values() if r.get("graphs") == "on"}

def stage_line(b, r):
    if r.get("stages"):
        parts = [f"block {st['block']}: {st['calls']} calls, {st['model_s']:.2f} s "
                 f"({1e3 * st['model_s'] / max(st['calls'], 1):.2f} ms a call)" for st in r["stages"]]
        return f"did run {b}: " + "; ".join(parts)
    if r.get("cut_short"):
        return f"did run {b}, stopped at the limit: {r['cut_short'].removeprefix('error: ')}"
    return f"did run {b}: no stage times (exit status {r.get('exit_status')})"

def counts_line(b, r):
    return f"did run {b}: {r['backend_counts']}" if r.get("backend_counts") else None

def best(kind, key, batch=None):
    rs = [r for r in pt.get(kind, []) if r.get(key) is not None and (batch is None or r.get("batch") == batch)]
    return max(rs, key=lambda r: r[key]) if rs else None

pt_train = best("train", "tokens_per_s")
spec = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16 tensor-core peak of the SXM parts
name = ceil.get("device", "")
peak = next((v for k, v in spec.items() if k in name), None)
flops = floors["train_step_model_flops"] / floors["batch"]  # per sequence of the preset `small`
tokens_per_seq = 1024
mfu = lambda tps: tps / tokens_per_seq * flops / peak if (tps and peak and preset == "small" and length in ("", "1024")) else None  # noqa: E731
rate = lambda b: (ours_sample.get(b) or {}).get("samples_per_s")  # noqa: E731
pt_rate = lambda b: (best("sample", "samples_per_s", b) or {}).get("samples_per_s")  # noqa: E731
ratio = lambda a, b: a / b if a and b else None  # noqa: E731
result = {
    "device": device(),
    "date": datetime.date.today().isoformat(),
    "backend": backend,
    "attention_kernel": os.environ.get("DID_CUDA_ATTENTION"),
    "draw_location": os.environ.get("DID_CUDA_DRAW"),
    "preset": preset,
    "train_tokens_per_s": ours_tps,
    "pytorch_train_tokens_per_s": pt_train["tokens_per_s"] if pt_train else None,
    "pytorch_train_variant": pt_train["variant"] if pt_train else None,
    "train_speedup": ratio(ours_tps, pt_train["tokens_per_s"] if pt_train else None),
    "train_mfu": mfu(ours_tps),
    "pytorch_train_mfu": mfu(pt_train["tokens_per_s"]) if pt_train else None,
    "sample_per_s_b1": rate(1),
    "pytorch_sample_per_s_b1": pt_rate(1),
    "sample_speedup_b1": ratio(rate(1), pt_rate(1)),
    "sample_per_s_b1_graphs": (graph_runs.get(1) or {}).get("samples_per_s"),
    "sample_per_s_b64": rate(64),
    "pytorch_sample_per_s_b64": pt_rate(64),
    "sample_speedup_b64": ratio(rate(64), pt_rate(64)),
    "peak_memory_bytes": null(train_mem),
    "pytorch_peak_memory_bytes": null(pt_mem),
    "sampling_time_limit_s": float(limit),
    "baseline_check": open(os.path.join(work, "check.txt")).read().strip().splitlines(),
    "ceilings": ceil,
    "floors": floors,
    "did_train_exit_status": int(train_rc),
    "did_train_fallback": train_fallback or None,
    "did_sample": list(every_run.values()),
    "pytorch": pt,
}
json.dump(result, open(os.path.join(out, "gpu.json"), "w"), indent=1)

# Runs that failed on the default paths and were run again with the fast paths off.
fallbacks = ([f"training with {train_fallback}"] if train_fallback else []) + \
    [f"run {r['run']} with {r['fallback']}" for r in every_run.values() if r.get("fallback")]
fallback_line = ("**Failed on the default paths, measured again with the fast paths off** (the did figures "
                 "above are those runs'): " + "; ".join(fallbacks) + ".\n") if fallbacks else ""
fmt = lambda x, f="{:,.0f}": "—" if x is None else f.format(x)  # noqa: E731
x = lambda r: "—" if r is None else f"{r:.2f} ×"  # noqa: E731
section = f"""<!-- gpu-bench:begin (written by scripts/gpu-bench.sh; edit outside these markers) -->
## Measured side by side ({result['date']})

Device: {result['device']}; PyTorch {pt.get('torch', '?')}. Ceilings measured in the same run: bf16 GEMM
{fmt(ceil.get('bf16_gemm_tflops'), '{:.0f}')} TFLOP/s, copy {fmt(ceil.get('copy_tbps'), '{:.2f}')} TB/s. Preset `{preset}`,
BD3 block 4, batch {floors['batch']} × {length or 'context'} tokens for training; draft → refine (`4,L:0.25`, first-hitting)
for sampling, each sampling run stopped after {limit} s (— = did not finish).

| what | did | PyTorch (best variant) | did / PyTorch | target |
|---|---:|---:|---:|---:|
| training tokens/s ({os.environ.get('PRECISION', 'bf16')}; PyTorch: bf16 autocast) | {fmt(ours_tps)} | {fmt(result['pytorch_train_tokens_per_s'])} ({result['pytorch_train_variant'] or '—'}) | {x(result['train_speedup'])} | ≥ 1.3 × |
| training MFU (of the {fmt(peak and peak / 1e12, '{:.0f}')} TFLOP/s bf16 peak) | {fmt(result['train_mfu'], '{:.1%}')} | {fmt(result['pytorch_train_mfu'], '{:.1%}')} | | ≥ 45 % |
| samples/s, batch 1 | {fmt(rate(1), '{:.3f}')} | {fmt(pt_rate(1), '{:.3f}')} | {x(result['sample_speedup_b1'])} | ≥ 3 × |
| samples/s, batch 64 | {fmt(rate(64), '{:.3f}')} | {fmt(pt_rate(64), '{:.3f}')} | {x(result['sample_speedup_b64'])} | ≥ 1.5 × |
| peak device memory, training (nvidia-smi) | {fmt(null(train_mem) and null(train_mem) / 2**30, '{:.1f} GiB')} | {fmt(null(pt_mem) and null(pt_mem) / 2**30, '{:.1f} GiB')} (whole bench) | | |

Every PyTorch variant: {', '.join(f"{r['variant']} {fmt(r.get('tokens_per_s'))} tokens/s" if 'tokens_per_s' in r else f"{r['variant']} failed ({r.get('error', '?')[:80]})" for r in pt.get('train', []))};
sampling {', '.join(f"{r['variant']} b{r.get('batch')} {fmt(r.get('samples_per_s'), '{:.3f}')}/s" for r in pt.get('sample', []))}.
Where did's sampling time went (time inside the model's calls, host draws included; the rest of the wall time is the
sampler's own work): {'. '.join(stage_line(r['run'], r) for r in every_run.values()) or '—'}.
What the backend asked of the GPU (`DID_CUDA_STATS=1`): {'. '.join(c for c in (counts_line(r['run'], r) for r in every_run.values()) if c) or '—'}.
{fallback_line}With the draft's passes recorded as CUDA graphs (`DID_CUDA_GRAPHS=on`, run `1g`): {fmt((graph_runs.get(1) or {}).get('samples_per_s'), '{:.3f}')} samples/s at batch 1{'; ' + (graph_runs.get(1) or {}).get('recording_failure') if (graph_runs.get(1) or {}).get('recording_failure') else ''}.
Rerun: `scripts/gpu-bundle.sh` on a build machine, then `scripts/gpu-bench.sh target/gpu-bundle docs/perf` on the GPU
host (raw figures in `gpu.json`).
<!-- gpu-bench:end -->
"""
md = os.path.join(out, "gpu.md")
# The hand-written page (floors, analysis) around the measured section comes from docs/perf/gpu.md.
text = open(md if os.path.exists(md) else "docs/perf/gpu.md").read()
begin, end = "<!-- gpu-bench:begin", "<!-- gpu-bench:end -->\n"
if begin in text and end in text:
    text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(md, "w").write(text)
print(json.dumps({k: v for k, v in result.items() if k not in ("pytorch", "floors", "ceilings", "did_sample")}, indent=1))
PY
