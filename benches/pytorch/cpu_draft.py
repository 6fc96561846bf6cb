"""Times the PyTorch reference's KV-cached draft call on the CPU (fp32, random weights): the
anchor of docs/perf/cpu-inference.md, run by scripts/cpu-inference-bench.sh.

    python3 benches/pytorch/cpu_draft.py [--preset small] [--prefix 512] [--batches 1,8] [--reps 20]

A draft call is what `draft_refine` does per revealed token: the block of 4 tokens after a
cached prefix of `--prefix` tokens, the head over the one picked row a sequence. Prints one JSON
object: torch's version and threads, the prefix, and per batch the median milliseconds a call.
"""

import argparse
import json
import statistics
import time

import torch

from did_torch import Config, Dit, KvCache, sdpa


@torch.no_grad()
def draft_ms(model: Dit, batch: int, prefix: int, reps: int) -> float:
    c = model.c
    cache = KvCache(c, batch, prefix + 4, torch.device("cpu"), torch.float32)
    cache.k[:, :, :, :prefix].normal_()
    cache.v[:, :, :, :prefix].normal_()
    cache.length = prefix
    tokens = torch.randint(0, c.vocab_size - 1, (batch, 4))
    positions = torch.arange(prefix, prefix + 4)
    pick = torch.zeros(batch, 1, dtype=torch.long)
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        model(tokens, positions, sdpa(), kv_cache=cache, out_rows=pick)
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Dit(Config.preset(args.preset)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "prefix": args.prefix,
        "draft_ms": {b: draft_ms(model, int(b), args.prefix, args.reps) for b in args.batches.split(",")},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
