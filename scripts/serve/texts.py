"""Starts `did [--backend B] serve` on a free port, sends 6 requests a fifth of a second apart (own
seeds and prompts, some n=2, one streamed), so that later ones join earlier ones mid-way and their
draft blocks, commits and refine calls share passes over several KV caches; prints their texts as
JSON, and stops the server with SIGTERM.
scripts/gpu-check.sh runs it on the GPU and on the CPU and compares: f32 backends are
token-identical, so the texts must be too.
    python3 scripts/serve/texts.py DID BACKEND
"""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

did, backend = sys.argv[1:3]
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
server = subprocess.Popen([did, "--backend", backend, "serve", "--port", str(port), "--max-batch", "16"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
try:
    first = server.stdout.readline()
    if "listening" not in first:
        print(first + server.stdout.read(), file=sys.stderr)
        sys.exit(1)
    requests = [{"prompt": p, "seed": i, "max_tokens": 48, **({"n": 2} if i % 2 else {})}
                for i, p in enumerate(["The ", "It was ", "We ", "In the year ", "Once ", "She "])]
    requests[0]["stream"] = True
    answers = [None] * len(requests)

    def send(i):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(requests[i]).encode(),
                                     {"content-type": "application/json"})
        body = urllib.request.urlopen(req, timeout=300).read().decode()
        if requests[i].get("stream"):
            chunks = [json.loads(l[6:]) for l in body.split("\n") if l.startswith("data: {")]
            answers[i] = [chunks[-1]["choices"][0]["text"]]
        else:
            answers[i] = [c["text"] for c in json.loads(body)["choices"]]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    print(json.dumps(answers))
finally:
    server.terminate()
    server.wait(60)
