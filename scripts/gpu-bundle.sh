#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU host that has no Rust
# toolchain: the release test binaries of did-backend-cuda and the `did`
# binary, stripped, in one git-ignored folder (target/gpu-bundle, < 60 MiB).
#
#   scripts/gpu-bundle.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/gpu-bundle}
rm -rf "$dir"
mkdir -p "$dir"

# The test executables, by test target name (ops, model, …).
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
        print(name, m["executable"])
' | while read -r name exe; do
    strip -o "$dir/$name" "$exe"
done

cargo build --release --locked -p did-cli --bin did
strip -o "$dir/did" target/release/did

ls -la "$dir"
du -sh "$dir"
