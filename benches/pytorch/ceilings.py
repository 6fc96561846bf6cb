"""The GPU's measured ceilings, the denominators of every floor and of MFU: a large bf16 GEMM
(TFLOP/s) and a large device-to-device copy (TB/s, bytes read + written). Prints JSON.

    python3 benches/pytorch/ceilings.py [--n 8192] [--copy-gib 4]
"""

import argparse
import json
import time

import torch


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--copy-gib", type=float, default=4.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to PyTorch"}))
        return
    n = args.n
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm = timed(lambda: a @ b, 20)
    elems = int(args.copy_gib * 2**30 / 4)
    src = torch.empty(elems, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), 20)
    print(json.dumps({"device": torch.cuda.get_device_name(), "gemm_n": n, "bf16_gemm_tflops": 2 * n**3 / gemm / 1e12,
                      "copy_bytes": 2 * elems * 4, "copy_tbps": 2 * elems * 4 / copy / 1e12}))


if __name__ == "__main__":
    main()
