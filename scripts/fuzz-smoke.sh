#!/usr/bin/env bash
# Runs every fuzz target, coverage-guided, on the stable toolchain: briefly in
# CI, for minutes or hours before a release.
#
# cargo-fuzz needs nightly only for sanitizers; libFuzzer's coverage
# instrumentation (SanitizerCoverage) is reachable from stable rustc flags,
# so we pass them ourselves. Overflow checks and debug assertions are on.
#
# usage: scripts/fuzz-smoke.sh [SECONDS_PER_TARGET] [PARALLEL_JOBS] [SUMMARY.md]
#        (defaults: 20 s, 1 job, no summary). A summary gets one table row per
#        target: seconds, executions, corpus size, result. FUZZ_TARGETS="a b"
#        runs only the targets named.
# fuzz/ is its own workspace with its own Cargo.lock: after changing the
# dependencies of a crate it fuzzes, refresh it with `(cd fuzz && cargo tree -q >/dev/null)`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
jobs="${2:-1}"
summary="${3:-}"
target="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts.
cargo build --release --locked --target "$target" --target-dir target/smoke
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

fuzz_one() { # name → writes $work/$name.status ("ok"/"FAILED") and $work/$name.log
  local name=$1
  mkdir -p "$work/$name" artifacts/"$name"
  cp corpus/"$name"/* "$work/$name/" 2>/dev/null || true
  if ./target/smoke/"$target"/release/"$name" -max_total_time="$seconds" \
       -artifact_prefix=artifacts/"$name"/ "$work/$name" 2>"$work/$name.log"; then
    echo ok >"$work/$name.status"
  else
    echo FAILED >"$work/$name.status"
  fi
}

names=()
for bin in fuzz_targets/*.rs; do names+=("$(basename "$bin" .rs)"); done
# FUZZ_TARGETS="a b" runs only those.
if [ -n "${FUZZ_TARGETS:-}" ]; then read -r -a names <<<"$FUZZ_TARGETS"; fi
running=0
for name in "${names[@]}"; do
  echo "== fuzz $name for ${seconds}s"
  fuzz_one "$name" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
done
wait || true

status=0
[ -n "$summary" ] && printf '| target | seconds | executions | corpus entries | result |\n|---|---:|---:|---:|---|\n' >"$summary"
for name in "${names[@]}"; do
  done_line=$(grep -E '^Done [0-9]+ runs' "$work/$name.log" | tail -n 1 || true)
  runs=$(echo "$done_line" | sed -n 's/^Done \([0-9]*\) runs.*/\1/p')
  corpus=$(find "$work/$name" -type f | wc -l)
  result=$(cat "$work/$name.status" 2>/dev/null || echo FAILED)
  if [ "$result" != ok ]; then
    echo "FAILED: $name (artifact in fuzz/artifacts/$name/)"; tail -n 30 "$work/$name.log"; status=1
  else
    echo "$name: ${done_line:-no summary line}"
  fi
  [ -n "$summary" ] && echo "| \`$name\` | $seconds | ${runs:-?} | $corpus | $result |" >>"$summary"
done
exit "$status"
