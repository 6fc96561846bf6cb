#!/usr/bin/env bash
# Fetches the independent judge of generated text: CMU PocketSphinx's generic
# US-English word trigram model (en-us.lm.bin, 27 MB, BSD-2), by package name
# from PyPI, both checked by sha256 (docs/data.md §3, §5). The same file
# is in Debian's pocketsphinx-en-us 0.8+5prealpha+1-15.
#
# usage: scripts/fetch-judges.sh [DIR]   (default data/judges; prints the model's path)
set -euo pipefail
dir="${1:-data/judges}"
wheel_sha=bb8fd0fc7fb08dd8f85da21f5121f34ebf4186a5bee91ce85e2d358e69a448bf
lm_sha=db21d0642286677699e6dbc859d2e5395570222361999387ce60f6e1d01995d6
mkdir -p "$dir"
if [ -f "$dir/en-us.lm.bin" ] && echo "$lm_sha  $dir/en-us.lm.bin" | sha256sum -c --status; then
  echo "$dir/en-us.lm.bin"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The wheel is built per Python version; the model inside is the same in all of them.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
  --platform manylinux2014_x86_64 -d "$tmp" pocketsphinx==5.1.1 >&2
wheel="$(ls "$tmp"/pocketsphinx-5.1.1-*.whl)"
echo "$wheel_sha  $wheel" | sha256sum -c --status || { echo "sha256 mismatch: $wheel" >&2; exit 1; }
python3 - "$wheel" "$dir/en-us.lm.bin.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read("pocketsphinx/model/en-us/en-us.lm.bin"))
PY
echo "$lm_sha  $dir/en-us.lm.bin.tmp" | sha256sum -c --status || { echo "sha256 mismatch: en-us.lm.bin" >&2; exit 1; }
mv "$dir/en-us.lm.bin.tmp" "$dir/en-us.lm.bin"
echo "$dir/en-us.lm.bin"
