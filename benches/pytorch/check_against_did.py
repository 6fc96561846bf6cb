"""Checks that the PyTorch baseline is the same model as did: its logits against those did's CPU
backend wrote for the demo checkpoint (`cargo run --release -p did-benches --example
reference_logits`), for a global refine pass, a block-causal draft pass without and with the KV
cache, and the x_t half of BD3's 2L training pass (SDPA, and FlexAttention where it runs).

    python3 benches/pytorch/check_against_did.py [REFERENCE] [CHECKPOINT] [--device cpu|cuda]

Exit status 0 when every comparison is within tolerance (f32: 2e-4 of the largest logit).
"""

import argparse
import gzip
import json
import sys

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from did_torch import Config, Dit, KvCache, block_causal_dense_mask, bd3_dense_mask, flex_bd3, sdpa


def read_checkpoint(path: str):
    """The tensors and the metadata of a did checkpoint (gzip or not)."""
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return load_safetensors(raw), header.get("__metadata__", {})


def config_from(meta: dict) -> Config:
    get = lambda k: meta[f"model.{k}"]  # noqa: E731
    if get("architecture") != "dit":
        raise SystemExit("the baseline implements the diffusion DiT only")
    return Config(layers=int(get("layers")), hidden=int(get("hidden")), heads=int(get("heads")),
                  context=int(get("context")), vocab_size=int(get("vocab_size")), mask_id=int(get("mask_id")),
                  cond_dim=int(get("cond_dim")), dropout=0.0, norm_eps=float(get("norm_eps")),
                  rope_base=float(get("rope_base")))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("reference", nargs="?", default="target/reference-logits.safetensors")
    ap.add_argument("checkpoint", nargs="?", default="data/demo/dit.safetensors.gz")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    tensors, meta = read_checkpoint(args.checkpoint)
    model = Dit(config_from(meta))
    model.load_did(tensors)
    model = model.to(dev).eval()
    ref = {k: v.to(dev) for k, v in load_file(args.reference).items()}
    meta_ref = read_checkpoint(args.reference)[1]
    draft_start, block = int(meta_ref["draft_start"]), int(meta_ref["block_size"])

    failures = 0

    def compare(label, ours, want):
        nonlocal failures
        err = (ours.float() - want.float()).abs().max().item()
        tol = 2e-4 * max(1.0, want.abs().max().item())
        ok = err <= tol
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}: max |diff| {err:.2e} (tolerance {tol:.1e})")

    with torch.no_grad():
        noisy = ref["noisy"].long()[None]
        clean = ref["clean"].long()[None]
        n = noisy.shape[1]
        compare("global refine pass", model(noisy, torch.arange(n, device=dev), sdpa())[0], ref["refine_logits"])

        window = ref["draft_tokens"].long()[None]
        w = window.shape[1]
        mask = block_causal_dense_mask(w, block, dev)
        got = model(window, torch.arange(w, device=dev), sdpa(mask))[0, draft_start:]
        compare("draft pass, no cache", got, ref["draft_logits"])

        cache = KvCache(model.c, 1, w, dev, torch.float32)
        for s in range(0, draft_start, block):
            model(window[:, s:s + block], torch.arange(s, s + block, device=dev), sdpa(), kv_cache=cache, commit=True)
            cache.finish_commit()
        got = model(window[:, draft_start:], torch.arange(draft_start, w, device=dev), sdpa(), kv_cache=cache)[0]
        compare("draft pass through the KV cache", got, ref["draft_cached_logits"])
        compare("did's cached vs uncached draft", ref["draft_cached_logits"], ref["draft_logits"])

        # BD3's 2L training pass: the x_t half's block at draft_start sees exactly the draft window.
        xt = clean.clone()
        xt[:, draft_start:w] = window[:, draft_start:]
        positions = torch.arange(n, device=dev).repeat(2)
        both = torch.cat([xt, clean], dim=1)
        train = model(both, positions, sdpa(bd3_dense_mask(n, block, dev)))[0, draft_start:w]
        compare("2L training pass (SDPA, dense BD3 mask), x_t half", train, ref["draft_logits"])
        try:
            flex = model(both, positions, flex_bd3(n, block, dev))[0, draft_start:w]
        except Exception as e:  # FlexAttention needs a compiler on some builds
            print(f"skip 2L training pass with FlexAttention: {type(e).__name__}: {str(e)[:120]}")
        else:
            compare("2L training pass (FlexAttention block mask), x_t half", flex, ref["draft_logits"])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
