#!/usr/bin/env bash
# CPU sampling against the memory floor, in every weight format (f32, bf16, int8), from one run
# on this machine: DRAM read bandwidth; for the `small` model (random weights) at batch 1 and 8 a
# KV-cached draft call against its floor, where its time goes, a global refine call
# (benches/examples/cpu_inference.rs); the PyTorch reference's CPU draft call as the anchor
# (benches/pytorch/cpu_draft.py, where torch imports: PYTHON=/path/to/python); then the formats'
# quality on the committed demo model (judge perplexity and entropy over SEEDS seeds, tokens
# identical to f32's). Writes docs/perf/cpu-inference.json and docs/perf/cpu-inference.md.
#   PYTHON=python3 SEEDS=5 REPS=15 scripts/cpu-inference-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SEEDS=${SEEDS:-5}
REPS=${REPS:-15}
OUT=${OUT:-docs/perf}
cargo build --release -q -p did-cli --bin did
cargo build --release -q -p did-benches --example cpu_inference
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if (cd benches/pytorch && "$PYTHON" -c "import torch" 2>/dev/null); then
    (cd benches/pytorch && "$PYTHON" cpu_draft.py --prefix 512 --batches 1,8 --reps "$REPS") > "$tmp/pytorch.json"
else
    echo "torch does not import with $PYTHON: no PyTorch anchor (set PYTHON)" >&2
    echo '{}' > "$tmp/pytorch.json"
fi
target/release/examples/cpu_inference --out "$tmp/speed.json" --prefix 512 --length 1024 --reps "$REPS"

for f in f32 bf16 int8; do
    for s in $(seq 1 "$SEEDS"); do
        target/release/did demo --weights "$f" --seed "$s" --samples 16 > "$tmp/demo-$f-$s.txt"
    done
    target/release/did sample --checkpoint data/demo/dit.safetensors.gz --weights "$f" \
        --num-samples 64 --batch 16 --seed 1 --out "$tmp/sample-$f.jsonl" > /dev/null
done
python3 scripts/cpu_inference_report.py "$tmp" "$OUT"
