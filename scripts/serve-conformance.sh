#!/usr/bin/env bash
# did serve against the official openai Python client (PyPI, pinned), on loopback, with the
# committed demo model: completions, streams, models, errors (scripts/serve/conformance.py).
# Then SIGTERM: the server must drain and exit 0.
#   DID=target/debug/did scripts/serve-conformance.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DID=${DID:-target/release/did}
VENV=${VENV:-target/openai-venv}
OPENAI_VERSION=3.63.0
if ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "openai==$OPENAI_VERSION"
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$DID" serve --port "$port" --max-batch 8 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
    if grep -q "listening on" "$log"; then break; fi
    if ! kill -0 $pid 2>/dev/null; then cat "$log"; echo "did serve did not start"; exit 1; fi
    sleep 0.2
done
"$VENV/bin/python" scripts/serve/conformance.py "http://127.0.0.1:$port"
kill -TERM $pid
if ! wait $pid; then cat "$log"; echo "did serve did not exit cleanly after SIGTERM"; exit 1; fi
grep -q "stopped" "$log" || { cat "$log"; echo "did serve did not say it stopped"; exit 1; }
echo "serve conformance: passed, and the server drained and exited 0 on SIGTERM"
