#!/usr/bin/env bash
# Runs every fuzz target briefly, coverage-guided, on the stable toolchain.
#
# cargo-fuzz needs nightly only for sanitizers; libFuzzer's coverage
# instrumentation (SanitizerCoverage) is reachable from stable rustc flags,
# so we pass them ourselves. Overflow checks and debug assertions are on.
#
# usage: scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]   (default 20)
# fuzz/ is its own workspace with its own Cargo.lock: after changing the
# dependencies of a crate it fuzzes, refresh it with `(cd fuzz && cargo tree -q >/dev/null)`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
target="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts.
cargo build --release --locked --target "$target" --target-dir target/smoke
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
for bin in fuzz_targets/*.rs; do
  name="$(basename "$bin" .rs)"
  mkdir -p "$work/$name" artifacts/"$name"
  cp corpus/"$name"/* "$work/$name/" 2>/dev/null || true
  echo "== fuzz $name for ${seconds}s"
  if ! ./target/smoke/"$target"/release/"$name" -max_total_time="$seconds" \
       -artifact_prefix=artifacts/"$name"/ "$work/$name" 2>"$work/$name.log"; then
    echo "FAILED: $name (artifact in fuzz/artifacts/$name/)"; tail -n 30 "$work/$name.log"; status=1
  else
    grep -E '^Done|DONE' "$work/$name.log" | tail -n 1
  fi
done
exit "$status"
