#!/usr/bin/env bash
# Adaptive draft → refine on one diffusion model: every update rule in the draft, in the
# refine and in both, fixed γ against adaptive remasking, each plan over several seeds,
# scored by both judges (issue #27; the rules are described in docs/sampling.md).
#
#   scripts/adaptive-sweep.sh            # the committed demo models (data/demo)
#
# Writes one `did eval gen-ppl --json` file per plan and seed under $RESULTS/samples,
# named as scripts/reproduce.sh names its experiments, so `did-report --results $RESULTS`
# tables and plots them; a file that exists is not recomputed. Settings (environment):
# DID (target/release/did, built first), BACKEND (cpu), RESULTS (runs/adaptive-demo),
# CHECKPOINT (data/demo/dit.safetensors.gz), JUDGE (data/demo/judge.safetensors.gz),
# JUDGE_LM (data/judges/en-us.lm.bin, fetched), SEEDS ("1 2 3"), SAMPLES (64),
# PLANS (a file of "name plan" lines; default: the list below), REPORT_DIR
# (docs/results/adaptive-demo), TITLE; DID_REPORT (default: cargo run -p did-report).
set -euo pipefail
cd "$(dirname "$0")/.."

did=${DID:-target/release/did}
backend=${BACKEND:-cpu}
results=${RESULTS:-runs/adaptive-demo}
checkpoint=${CHECKPOINT:-data/demo/dit.safetensors.gz}
judge=${JUDGE:-data/demo/judge.safetensors.gz}
judge_lm=${JUDGE_LM:-data/judges/en-us.lm.bin}
seeds=${SEEDS:-1 2 3}
samples=${SAMPLES:-64}
report_dir=${REPORT_DIR:-docs/results/adaptive-demo}
title=${TITLE:-Adaptive draft → refine on the demo model}

if [ -z "${DID:-}" ]; then
    cargo build --release --locked -p did-cli --bin did
fi
[ -f "$judge_lm" ] || scripts/fetch-judges.sh "$(dirname "$judge_lm")"
mkdir -p "$results/samples"
length=$("$did" model-info "$checkpoint" | sed -n 's/.*context \([0-9]*\).*/\1/p' | head -n 1 || true)
printf '{"backend": "%s", "checkpoint": "%s", "judge": "%s", "samples": %d, "seeds": "%s", "length": "%s"}\n' \
    "$backend" "$checkpoint" "$judge" "$samples" "$seeds" "${length:-the model context}" >"$results/settings.json"

# name plan. Names say the model, where the rule acts and its parameter.
plans="
mix.draft                         4
mix.snapshot                      4,L:0.25
mix.draft-threshold-0.9           4@threshold:0.9
mix.draft-threshold-0.7           4@threshold:0.7
mix.draft-threshold-0.5           4@threshold:0.5
mix.draft-threshold-0.3           4@threshold:0.3
mix.draft-entropy-0.3             4@entropy:0.3
mix.draft-entropy-0.5             4@entropy:0.5
mix.draft-entropy-0.7             4@entropy:0.7
mix.draft-entropy-1               4@entropy:1
mix.draft-topk-2                  4@topk:2
mix.refine-threshold-0.9          4,L:0.25@threshold:0.9
mix.refine-threshold-0.7          4,L:0.25@threshold:0.7
mix.refine-threshold-0.5          4,L:0.25@threshold:0.5
mix.refine-threshold-0.3          4,L:0.25@threshold:0.3
mix.refine-entropy-0.5            4,L:0.25@entropy:0.5
mix.refine-entropy-1              4,L:0.25@entropy:1
mix.refine-entropy-2              4,L:0.25@entropy:2
mix.refine-entropy-3              4,L:0.25@entropy:3
mix.both-threshold-0.9            4@threshold:0.9,L:0.25@threshold:0.9
mix.both-entropy-0.5-1            4@entropy:0.5,L:0.25@entropy:1
mix.gamma-0.1                     4,L:0.1
mix.gamma-0.5                     4,L:0.5
mix.adaptive-below-0.05           4,L:below:0.05:0..0.25
mix.adaptive-below-0.1            4,L:below:0.1:0..0.25
mix.adaptive-below-0.2            4,L:below:0.2:0.05..0.5
mix.adaptive-below-0.3-threshold  4@threshold:0.9,L:below:0.3:0..0.25@threshold:0.9
mix.adaptive-below-0.2-entropy    4@entropy:0.5,L:below:0.2:0..0.25@entropy:1
"
[ -n "${PLANS:-}" ] && plans=$(cat "$PLANS")

for seed in $seeds; do
    while read -r name plan; do
        [ -z "$name" ] && continue
        json=$results/samples/$name.seed-$seed.json
        [ -f "$json" ] && continue
        printf '[%s] %s seed %s: %s\n' "$(date -u +%H:%M:%S)" "$name" "$seed" "$plan" >&2
        "$did" --backend "$backend" eval gen-ppl --checkpoint "$checkpoint" --judge "$judge" \
            --word-judge "$judge_lm" --stages "$plan" --seed "$seed" --num-samples "$samples" \
            --batch "$samples" --json "$json.tmp" >/dev/null
        mv "$json.tmp" "$json"
    done <<<"$plans"
done

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- did-core did-backend-cpu did-cli did-report Cargo.lock scripts/adaptive-sweep.sh 2>/dev/null ||
    commit="$commit (with uncommitted changes)"
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || true)
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo 2>/dev/null || true)
machine="$(nproc 2>/dev/null || echo ?) × ${cpu:-unknown CPU}, ${mem:-? GiB}"
report=(cargo run --release --locked -p did-report --)
[ -n "${DID_REPORT:-}" ] && report=("$DID_REPORT")
"${report[@]}" --results "$results" --out "$report_dir" --commit "$commit" --machine "$machine" --sweep "$title"
