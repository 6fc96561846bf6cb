#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU host that has no Rust
# toolchain: the release test binaries of did-backend-cuda, the `did`
# binary and the reference_logits and profile_ops examples, stripped, in one git-ignored folder (target/gpu-bundle, < 60 MiB).
#
#   scripts/gpu-bundle.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/gpu-bundle}
rm -rf "$dir"
mkdir -p "$dir"

# The test executables, by test target name (ops, model, …). emulated_kernels is left out: it
# needs a C++ compiler and the source tree, not a GPU, and runs in CI.
cargo test --release --locked -p did-backend-cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = "unit" if kind == "lib" else m["target"]["name"]
        if name != "emulated_kernels":
            print(name, m["executable"])
' | while read -r name exe; do
    strip -o "$dir/$name" "$exe"
done

cargo build --release --locked -p did-cli --bin did
strip -o "$dir/did" target/release/did
# The logits the PyTorch baseline is checked against (scripts/gpu-bench.sh runs it first).
cargo build --release --locked -p did-benches --example reference_logits --example profile_ops
mkdir -p "$dir/examples"
strip -o "$dir/examples/reference_logits" target/release/examples/reference_logits
# Where did's time goes, per op (scripts/gpu-bench.sh writes it beside its figures).
strip -o "$dir/examples/profile_ops" target/release/examples/profile_ops

ls -la "$dir"
du -sh "$dir"
