"""Times the PyTorch baseline: BD3 training steps and draft -> remask -> refine sampling.

    python3 benches/pytorch/bench.py [--device cuda] [--preset small] [--out bench.json]
        [--train-variants eager-sdpa,eager-sdpa-masked,compile-flex] [--sample-variants eager,compile]
        [--batch 8] [--steps 10] [--sample-batches 1,64] [--length 1024] [--time-limit 120]

Every figure is a wall-clock time around synchronised GPU work, after warm-up (a compiled
variant's compilation is timed separately and not counted). Writes one JSON object: the device,
torch's version, per training variant tokens/s and peak memory, per sampling variant and batch
samples/s and denoiser calls. A sampling run past --time-limit seconds is stopped and reported
as such (its rate then is from the blocks it finished).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from did_torch import Config, Dit, bd3_dense_mask, bd3_loss, draft_refine, flex_bd3, sdpa


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(dev) -> int | None:
    return torch.cuda.max_memory_allocated() if dev.type == "cuda" else None


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_train(variant: str, c: Config, args, dev) -> dict:
    # compiled-attention[-masked]: "masked" runs the head over the masked rows only.
    compiled, attention, *rest = variant.split("-")
    masked_head = rest == ["masked"]
    torch.manual_seed(0)
    model = Dit(c).to(dev).train()
    # The zero-initialised head and adaLN would make the first steps trivial: perturb them.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    fused = dev.type == "cuda"
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=fused)
    # BD3-LM's EMA of the weights (decay 0.9999 after its warm-up), updated every step as did's
    # trainer does: one foreach pass, as PyTorch at its best does it.
    ema = [p.detach().clone() for p in params]
    ema_updates = [0]
    n = args.length
    attend = sdpa(bd3_dense_mask(n, args.block, dev)) if attention == "sdpa" else flex_bd3(n, args.block, dev)
    loss_fn = torch.compile(bd3_loss) if compiled == "compile" else bd3_loss
    gen = torch.Generator(device=dev).manual_seed(1)
    x0 = torch.randint(0, c.vocab_size - 1, (args.batch, n), device=dev, generator=gen)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = loss_fn(model, x0, args.block, attend, gen, masked_head)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        k = ema_updates[0]
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - min(0.9999, (1 + k) / (10 + k)))
        ema_updates[0] = k + 1
        return loss

    reset_peak(dev)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(dev)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(dev)
    secs = (time.perf_counter() - t0) / args.steps
    return {"variant": variant, "batch": args.batch, "length": n, "block": args.block,
            "seconds_per_step": secs, "tokens_per_s": args.batch * n / secs, "warmup_s": warmup_s,
            "final_loss": loss.item(), "peak_memory_bytes": peak_bytes(dev)}


def bench_sample(variant: str, c: Config, batch: int, args, dev) -> dict:
    torch.manual_seed(0)
    model = Dit(c).to(dev).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if args.sample_dtype == "bf16":
        model = model.to(torch.bfloat16)
    runner = model
    if variant == "compile":
        # The cache grows by one block per commit: dynamic shapes instead of a recompile per length.
        runner = torch.compile(model, dynamic=True)
    gen = torch.Generator(device=dev).manual_seed(2)
    reset_peak(dev)
    t0 = time.perf_counter()
    draft_refine(runner, batch, min(64, args.length), generator=gen)  # warm-up (and compile)
    sync(dev)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, calls = draft_refine(runner, batch, args.length, generator=gen, deadline=t0 + args.time_limit)
    sync(dev)
    secs = time.perf_counter() - t0
    finished = calls.get("finished", True)
    return {"variant": variant, "batch": batch, "length": args.length, "dtype": args.sample_dtype,
            "seconds": secs, "samples_per_s": batch / secs if finished else None, "finished": finished,
            "denoiser_calls": calls, "warmup_s": warmup_s, "peak_memory_bytes": peak_bytes(dev)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--length", type=int, default=None, help="sequence length (default: the preset's context)")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--train-variants", default="eager-sdpa,compile-flex")
    ap.add_argument("--sample-variants", default="eager")
    ap.add_argument("--sample-batches", default="1,64")
    ap.add_argument("--sample-dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per sampling run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    c = Config.preset(args.preset)
    args.length = args.length or c.context
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset, "train": [], "sample": []}
    for v in filter(None, args.train_variants.split(",")):
        try:
            r = bench_train(v, c, args, dev)
        except Exception as e:  # one variant failing (a compiler missing) must not hide the others
            r = {"variant": v, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(r), flush=True)
        result["train"].append(r)
    for v in filter(None, args.sample_variants.split(",")):
        for b in map(int, filter(None, args.sample_batches.split(","))):
            try:
                r = bench_sample(v, c, b, args, dev)
            except Exception as e:
                r = {"variant": v, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(r), flush=True)
            result["sample"].append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
