#!/usr/bin/env bash
# The GPU check. Runs on a machine with an NVIDIA GPU, CUDA 13 libraries and
# no Rust toolchain, from the repository root, over a bundle built elsewhere
# by scripts/gpu-bundle.sh:
#
#   scripts/gpu-check.sh [BUNDLE] [OUT]      (defaults: target/gpu-bundle docs/gpu)
#
# 1. finds the CUDA libraries (driver, NVRTC, cuBLAS) and puts them on LD_LIBRARY_PATH;
# 2. runs every CUDA test one by one with DID_REQUIRE_CUDA=1 (a missing
#    library fails instead of skipping), timing each, then the model tests
#    again with the reference attention kernels and host draws (DID_CUDA_ATTENTION=reference DID_CUDA_DRAW=host);
#    each test that failed runs again with the fast paths off (TRIAGE_SWITCHES) and, where that
#    passes, with each one off alone, within TRIAGE_LIMIT = 120 s taken off the bench's limit,
#    so the report says which path broke it;
# 3. trains `tiny` for a few steps with `did --backend cuda` (f32 and bf16),
#    samples draft → remask → refine from it on the GPU and on the CPU and
#    checks the tokens are identical;
# 4. runs scripts/gpu-bench.sh: `small` training and draft → refine sampling, did and the
#    PyTorch baseline side by side, and the per-op profile, into OUT/gpu.json, OUT/gpu.md and
#    OUT/gpu-profile.md (SKIP_BENCH=1 skips it). Sized for one call of a 15-minute lease (≈ 5 min
#    on an H200, 2026-11-28): 60 s a sampling run and for the profile, PyTorch eager only (its head
#    over every x_t row, and over the masked rows only as did runs it), the
#    whole bench cut at BENCH_LIMIT = 420 s (its profile, run last, shortened or skipped to end
#    20 s before, so the baseline and the report always fit); set TIME_LIMIT, PROFILE_LIMIT, PT_TRAIN
#    (eager-sdpa,compile-flex for PyTorch at its best) where there is more time;
# 5. writes OUT/check-YYYY-MM-DD.md (device, driver, each test's result and
#    time, the end-to-end and speed figures) and OUT/check-YYYY-MM-DD.log.
# Exit status: 0 when everything passed.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-target/gpu-bundle}
out=${2:-docs/gpu}
mkdir -p "$out"
day=$(date -u +%F)
report="$out/check-$day.md"
log="$out/check-$day.log"
: >"$log"
t0=$(date +%s.%N)
failed=0
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(date +%s.%N)"; }

# ---- 1. libraries -------------------------------------------------------------------------
add_lib_dir() {
    local name=$1
    if ldconfig -p 2>/dev/null | grep -q "$name"; then return 0; fi
    local found
    found=$(find /usr/local /usr/lib /usr/lib64 /opt -name "$name*" -not -path '*/stubs/*' 2>/dev/null | head -n 1)
    if [ -n "$found" ]; then
        export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "found $name in $(dirname "$found")" | tee -a "$log"
    else
        echo "MISSING: $name" | tee -a "$log"
    fi
}
for lib in libcuda.so.1 libnvrtc.so.13 libnvrtc-builtins.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do add_lib_dir "$lib"; done
# NCCL also comes in PyPI's nvidia-nccl wheels (a PyTorch install has one).
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2 && [[ "${LD_LIBRARY_PATH:-}" != *nccl* ]]; then
    nccl_dir=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
    [ -n "$nccl_dir" ] && export LD_LIBRARY_PATH="$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" && echo "found libnccl.so.2 in $nccl_dir" | tee -a "$log"
fi
device=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -n 1)
echo "device: $device" | tee -a "$log"

# ---- 2. the CUDA tests ------------------------------------------------------------------------
export DID_REQUIRE_CUDA=1
rows=""
failed_tests=()
# Every test of one binary, one by one: run_tests BIN [SUFFIX [VAR=VALUE …]] (the variables are
# set for these runs only; SUFFIX labels the rows).
run_tests() {
    local bin=$1 suffix=${2:-} name t s rc secs status
    shift 2 2>/dev/null || shift
    name=$(basename "$bin")
    for t in $("$bin" --list --format=terse 2>/dev/null | sed -n 's/: test$//p'); do
        s=$(date +%s.%N)
        echo "==== $name::$t $suffix" >>"$log"
        env "$@" "$bin" --exact "$t" --test-threads=1 --nocapture >>"$log" 2>&1
        rc=$?
        secs=$(elapsed "$s")
        if [ $rc -eq 0 ]; then status=pass; else status="**FAIL**"; failed=1; fi
        [ $rc -ne 0 ] && [ -z "$suffix" ] && failed_tests+=("$bin $t")
        echo "$status $name::$t $suffix (${secs} s)"
        rows+="| \`$name::$t\` $suffix | $status | $secs |"$'\n'
    done
}
for bin in "$bundle"/*; do
    [ -f "$bin" ] && [ "$(basename "$bin")" != did ] && run_tests "$bin"
done
# The model tests again with the other attention kernels (bf16 uses the flash kernels by default)
# and tokens drawn on the host (the device draws them by default): the whole model, trained and
# sampled, agreeing with the CPU within the bf16 bands, and the f32 draft → remask → refine token
# for token.
[ -x "$bundle/model" ] && run_tests "$bundle/model" "(DID_CUDA_ATTENTION=reference DID_CUDA_DRAW=host)" \
    DID_CUDA_ATTENTION=reference DID_CUDA_DRAW=host

# ---- 2b. triage: which fast path a failure needs -------------------------------------------------------
# Each failed test again with every switch below (the fast paths off); where that passes, once
# with each switch alone, so the failure names the path that broke it: the flash attention, the
# device draw, the few-rows GEMMs, the key split. A test that picks its path itself (e.g.
# set_attention_kernel) is not rescued by a switch. Three failures in a row that no switch
# rescues end the triage: the cause is then the setup or a shared kernel, not one path.
switches=(${TRIAGE_SWITCHES:-DID_CUDA_ATTENTION=reference DID_CUDA_DRAW=host DID_CUDA_FEW_ROWS=off DID_CUDA_KEY_SPLIT=off})
triage=""
triage_note=""
triage_start=$(date +%s)
triage_deadline=$(( triage_start + ${TRIAGE_LIMIT:-120} ))
unrescued=0
retry() { # VAR=VALUE… -- BIN TEST: passes or not, within what is left of the triage's time
    local vars=() left
    while [ "$1" != -- ]; do vars+=("$1"); shift; done
    shift
    left=$(( triage_deadline - $(date +%s) ))
    [ "$left" -ge 5 ] || return 2
    echo "==== triage $(basename "$1")::$2 with ${vars[*]}" >>"$log"
    env "${vars[@]}" timeout "$left" "$1" --exact "$2" --test-threads=1 --nocapture >>"$log" 2>&1 || return 1
}
for entry in "${failed_tests[@]}"; do
    bin=${entry%% *} t=${entry#* }
    if [ "$unrescued" -ge 3 ]; then
        triage_note="Stopped after three failures that no switch rescues: look at the setup or a kernel every path shares."
        break
    fi
    retry "${switches[@]}" -- "$bin" "$t"
    all=$?
    [ "$all" -eq 2 ] && { triage_note="Out of triage time (TRIAGE_LIMIT)."; break; }
    line="| \`$(basename "$bin")::$t\` |"
    if [ "$all" -ne 0 ]; then
        unrescued=$((unrescued + 1))
        for _ in "${switches[@]}"; do line+=" — |"; done
        triage+="$line fail |"$'\n'
        continue
    fi
    unrescued=0
    for set in "${switches[@]}"; do
        retry "$set" -- "$bin" "$t"
        case $? in 0) line+=" pass |" ;; 1) line+=" fail |" ;; *) line+=" (no time) |" ;; esac
    done
    triage+="$line pass |"$'\n'
done
triage_secs=$(( $(date +%s) - triage_start ))
if [ -n "$triage" ]; then
    header="| failed test |"
    rule="|---|"
    for set in "${switches[@]}"; do
        header+=" $set |"
        rule+="---|"
    done
    triage="Each failed test again with all of these fast paths off (last column), and where that passes,
with each one off alone (\`pass\` names the path that broke it), in ${triage_secs} s. $triage_note

$header all off |
$rule---|
$triage"
    echo "$triage" | tee -a "$log"
else
    triage="(no test failed)"
fi

# ---- 3. end to end with the did binary ---------------------------------------------------------------
did="$bundle/did"
work=$(mktemp -d)
e2e=""
run() { # label, command…
    local label=$1
    shift
    local s
    s=$(date +%s.%N)
    echo "==== $label: $*" >>"$log"
    if "$@" >"$work/stdout" 2>>"$log"; then
        e2e+="| $label | pass | $(elapsed "$s") |"$'\n'
        cat "$work/stdout" >>"$log"
        return 0
    fi
    cat "$work/stdout" >>"$log"
    e2e+="| $label | **FAIL** | $(elapsed "$s") |"$'\n'
    failed=1
    return 1
}
run "data prepare (bytes, CPU)" "$did" data prepare data/excerpt --tokenizer bytes --out "$work/data"
for precision in f32 bf16; do
    run "train tiny mix-scale, 30 steps, batch 8 ($precision)" "$did" --backend cuda --precision "$precision" train \
        --data "$work/data" --model tiny --objective mix-scale --blocks 4:0.9,L:0.1 --batch 8 --steps 30 \
        --lr 1e-3 --warmup 5 --out "$work/run-$precision"
    grep -h '"step":30' "$work/run-$precision/metrics.jsonl" >>"$log" 2>/dev/null
done
# Data parallel over NCCL (tests/nccl.rs ran a world of one above): two processes where the host
# has two GPUs, against one process accumulating two micro-batches (docs/training.md).
if [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -ge 2 ]; then
    for how in "--gpus 2" "--accumulate 2"; do
        run "train tiny mix-scale, 10 steps, batch 4, $how (f32)" "$did" --backend cuda train \
            --data "$work/data" --model tiny --objective mix-scale --blocks 4:0.9,L:0.1 --batch 4 --steps 10 \
            --lr 1e-3 --warmup 5 --rank-timeout 120 --out "$work/dp-${how// /}" $how
    done
    grep -h '"step":10' "$work"/dp-*/metrics.jsonl >>"$log" 2>/dev/null
else
    e2e+="| train on 2 GPUs over NCCL (--gpus 2) | skipped: one GPU | |"$'\n'
fi
ckpt=$(ls "$work"/run-f32/ckpt-*.safetensors 2>/dev/null | tail -n 1)
if [ -n "$ckpt" ]; then
    run "eval nelbo at block 4, 16 sequences (cuda)" "$did" --backend cuda eval nelbo --checkpoint "$ckpt" \
        --data "$work/data" --block 4 --max-sequences 16
    run "eval gen-ppl of the committed demo model, 8 samples (cuda)" "$did" --backend cuda eval gen-ppl \
        --checkpoint data/demo/dit.safetensors.gz --judge data/demo/judge.safetensors.gz --num-samples 8 --batch 8
    for backend in cuda cpu; do
        run "sample 4,L:0.25 snapshot, 4 samples ($backend)" "$did" --backend "$backend" sample --checkpoint "$ckpt" \
            --stages 4,L:0.25 --num-samples 4 --seed 3 --out "$work/samples-$backend.jsonl"
    done
    if python3 - "$work/samples-cuda.jsonl" "$work/samples-cpu.jsonl" >>"$log" 2>&1 <<'PY'
import json, sys
a, b = ([json.loads(l)["tokens"] for l in open(p)] for p in sys.argv[1:3])
print("samples identical:", a == b, len(a), "samples")
sys.exit(0 if a == b and a else 1)
PY
    then e2e+="| GPU and CPU samples token-identical (f32) | pass | |"$'\n'
    else e2e+="| GPU and CPU samples token-identical (f32) | **FAIL** | |"$'\n'; failed=1
    fi
fi
# did serve on the GPU: six requests, each joining the running ones (shared passes over several KV
# caches), answer what the CPU server answers.
for backend in cuda cpu; do
    run "did serve, 6 overlapping requests on the demo model ($backend)" python3 scripts/serve/texts.py "$did" "$backend" &&
        cp "$work/stdout" "$work/serve-$backend.json"
done
if [ -s "$work/serve-cuda.json" ] && cmp -s "$work/serve-cuda.json" "$work/serve-cpu.json"; then
    e2e+="| did serve: GPU and CPU answers identical (f32) | pass | |"$'\n'
else
    e2e+="| did serve: GPU and CPU answers identical (f32) | **FAIL** | |"$'\n'; failed=1
fi

# ---- 4. speed, side by side with the PyTorch baseline (scripts/gpu-bench.sh) -----------------------
rm -rf "$work"
s=$(date +%s.%N)
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    speed="(skipped: SKIP_BENCH=1)"
# The bench shortens its profile to end 20 s before the limit, so the limit cuts nothing else.
# The triage's time comes off the bench's (the profile, run last, gives way first).
elif bench_limit=$(( ${BENCH_LIMIT:-420} - triage_secs )) &&
    TIME_LIMIT=${TIME_LIMIT:-60} PROFILE_LIMIT=${PROFILE_LIMIT:-60} PT_TRAIN=${PT_TRAIN:-eager-sdpa,eager-sdpa-masked} \
    BENCH_DEADLINE=$(( $(date +%s) + bench_limit - 20 )) \
    timeout "$bench_limit" scripts/gpu-bench.sh "$bundle" "$out" >>"$log" 2>&1; then
    speed=$(sed -n '/gpu-bench:begin/,/gpu-bench:end/p' "$out/gpu.md" | grep -v 'gpu-bench:')
    echo "bench done in $(elapsed "$s") s: $out/gpu.json" | tee -a "$log"
else
    speed="scripts/gpu-bench.sh failed after $(elapsed "$s") s: see $out/gpu-bench.log"
    failed=1
fi

# ---- 5. the report ------------------------------------------------------------------------------------
total=$(elapsed "$t0")
verdict=$([ $failed -eq 0 ] && echo "every check passed" || echo "SOME CHECKS FAILED")
cat >"$report" <<MD
# GPU check, $day

- device (name, driver, memory, compute capability): $device
- result: **$verdict**, in $total s
- how: \`scripts/gpu-bundle.sh\` on the build machine, then \`scripts/gpu-check.sh\` on the GPU host
  (DID_REQUIRE_CUDA=1: a missing library fails). The full log is \`check-$day.log\` beside this file.

## CUDA tests (did-backend-cuda, release, one by one)

| test | result | seconds |
|---|---|---:|
$rows
## Triage

$triage

## End to end (\`did --backend cuda\`)

| step | result | seconds |
|---|---|---:|
$e2e
## Speed (scripts/gpu-bench.sh: did and the PyTorch baseline in the same run)

$speed
MD
echo "$verdict in $total s; report: $report"
exit $failed
