#!/usr/bin/env bash
# did serve under load on this machine's CPU, with the committed demo model (L = 128): throughput
# and latency at concurrency 1, 4, 16 and 64, for the paper's plan and for the draft alone
# (benches/examples/serve_load.rs, closed loop, each request its own seed and prompt), against the
# same requests as sequential `did sample` runs;
# then, with SOAK=seconds, an overload soak (concurrency 128 on a queue of 32: 429s, failures,
# the server's memory over time). Writes docs/perf/serve.json and docs/perf/serve.md.
#   SECONDS_PER_LEVEL=60 SOAK=600 scripts/serve-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PER=${SECONDS_PER_LEVEL:-60}
SOAK=${SOAK:-0}
MAX_TOKENS=${MAX_TOKENS:-64}
OUT=${OUT:-docs/perf}
cargo build --release -q -p did-cli --bin did
cargo build --release -q -p did-benches --example serve_load
DID=target/release/did
LOAD=target/release/examples/serve_load
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start_server() { # $1 port, then flags
    local port=$1; shift
    "$DID" serve --port "$port" "$@" >"$tmp/serve-$port.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do grep -q "listening on" "$tmp/serve-$port.log" && return; sleep 0.2; done
    cat "$tmp/serve-$port.log"; exit 1
}
tmp=$(mktemp -d)
trap 'kill ${server:-0} 2>/dev/null || true; rm -rf "$tmp"' EXIT
json="$tmp/serve.jsonl"

# The baseline: the same kind of request as one `did sample` process each, one after another.
n=8
t0=$(date +%s.%N)
for i in $(seq 0 $((n - 1))); do
    "$DID" sample --checkpoint data/demo/dit.safetensors.gz --prompt "The " --seed "$i" --stop-at-eos >/dev/null
done
t1=$(date +%s.%N)
python3 -c "import json; w=$t1-$t0; print(json.dumps({'baseline': 'sequential did sample processes', 'completions': $n, 'seconds': round(w, 2), 'completions_per_s': round($n / w, 3), 'mean_s': round(w / $n, 3)}))" >>"$json"

# The paper's plan, then the draft alone (no global refine passes).
for plan in "4,L:0.25" "4"; do
    port=$(free_port)
    start_server "$port" --max-batch 64 --queue 1024 --stages "$plan"
    rss0=$(ps -o rss= -p "$server")
    "$LOAD" "127.0.0.1:$port" "$PER" "$MAX_TOKENS" 1 4 16 64 | sed "s/^{/{\"plan\": \"$plan\", /" >>"$json"
    rss1=$(ps -o rss= -p "$server")
    echo "{\"plan\": \"$plan\", \"server_rss_kib\": {\"start\": $rss0, \"after_levels\": $rss1}}" >>"$json"
    kill -TERM "$server"; wait "$server" || true
done

if [ "$SOAK" -gt 0 ]; then
    port=$(free_port)
    start_server "$port" --max-batch 16 --queue 32
    soak_rss="$tmp/rss"
    ( while kill -0 "$server" 2>/dev/null; do echo "$(date +%s) $(ps -o rss= -p "$server")"; sleep 10; done ) >"$soak_rss" &
    "$LOAD" "127.0.0.1:$port" "$SOAK" "$MAX_TOKENS" 128 | sed 's/^{/{"soak": true, /' >>"$json"
    alive=$(kill -0 "$server" 2>/dev/null && echo true || echo false)
    kill -TERM "$server"; wait "$server" || true
    python3 - "$soak_rss" "$alive" >>"$json" <<'PY'
import json, sys
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 2]
rss = [int(r[1]) for r in rows]
print(json.dumps({"soak_rss_kib": {"first": rss[0], "max": max(rss), "last": rss[-1], "samples": len(rss), "every_10_s": rss}, "soak_server_alive_at_end": sys.argv[2] == "true"}))
PY
fi
mkdir -p "$OUT"
python3 scripts/serve/report.py "$json" "$OUT" "$(lscpu | grep 'Model name' | sed 's/.*: *//') ($(nproc) cores)" "$MAX_TOKENS" "$PER"
echo "wrote $OUT/serve.json and $OUT/serve.md"
