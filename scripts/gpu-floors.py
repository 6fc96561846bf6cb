#!/usr/bin/env python3
"""The floors of the CUDA performance issue: FLOPs and fewest bytes of one
training step and of the sampling calls of the `small` model, divided by a
GPU's ceilings. Pure arithmetic from the model's shape; prints markdown.

    python3 scripts/gpu-floors.py [--tflops 790] [--tbps 4.3] [--batch 8]

The defaults are the H200 ceilings seen on this workplace's machines
(KINDS.md: an 8192³ bf16 GEMM at ≈ 790 TFLOP/s, a device-to-device copy at
≈ 4.3 TB/s counting bytes read and written); scripts/gpu-check.sh should
measure them in the same run as everything else.
"""
import argparse

p = argparse.ArgumentParser()
p.add_argument("--tflops", type=float, default=790.0, help="bf16 dense GEMM ceiling, TFLOP/s")
p.add_argument("--tbps", type=float, default=4.3, help="memory ceiling, TB/s (read + write)")
p.add_argument("--batch", type=int, default=8, help="training sequences per step")
p.add_argument("--json", action="store_true", help="print the counts scripts/gpu-bench.sh uses, as JSON")
a = p.parse_args()

d, layers, L, V = 768, 12, 1024, 50258
mlp = 4 * d
params = 169_627_218  # did model-info small

peak = a.tflops * 1e12
bw = a.tbps * 1e12


def ms(x):
    return f"{x * 1e3:.3f} ms"


def linear_flops(tokens):
    """Forward FLOPs of one layer's linear maps (qkv, out, MLP) over `tokens`."""
    return 2 * tokens * (3 * d * d + d * d + 2 * d * mlp)


# ---- one BD3 training step (the 2L pass: x_t ⊕ x_0, block 4) ----------------------------------
tokens = 2 * L
# Allowed (query, key) pairs of the BD3 mask at block 4: a noisy query sees its block (4) and the
# clean prefix before it; a clean query sees the clean prefix up to the end of its block.
b = 4
pairs = sum(b + (q // b) * b for q in range(L)) + sum(((q // b) + 1) * b for q in range(L))
attn_fwd = 4 * d * pairs  # QKᵀ and PV, every head together
attn_total = attn_fwd * (1 + 2 + 1)  # forward, backward (2×), and the forward recomputed by a flash backward
lin_total = 3 * linear_flops(tokens)  # forward + two backward GEMMs
# The head over the x_t half's masked rows only: a row of loss weight 0 (an unmasked position,
# SUBS) adds nothing to the loss or the gradients, and did runs the head over the weighted rows
# (decision 55). Under the linear schedule t is uniform over (ε, 1), so half the rows on average.
masked_fraction = 0.5
head_total = 3 * 2 * masked_fraction * L * d * V
head_all_rows = 3 * 2 * L * d * V  # what a head over every x_t row computes
step_flops_seq = layers * (lin_total + attn_total) + head_total
step_flops = a.batch * step_flops_seq
# Fewest bytes: bf16 weights read (fwd + bwd) and gradient written, AdamW on f32 master weights
# (read p, g, m, v; write p, m, v), the bf16 logits of the masked rows written once and read once.
weights_bytes = params * (2 * 2 + 2)
adam_bytes = params * 4 * 7
logits_bytes = a.batch * masked_fraction * L * V * 2 * 2
step_bytes = weights_bytes + adam_bytes + logits_bytes
dense_pairs = (2 * L) ** 2
# Model FLOPs (what MFU counts): the step without the forward a flash backward recomputes.
model_flops = step_flops - a.batch * layers * attn_fwd
if a.json:
    import json

    print(json.dumps({"batch": a.batch, "train_step_flops": step_flops, "train_step_model_flops": model_flops,
                      "train_step_bytes": step_bytes, "parameters": params}))
    raise SystemExit(0)

print(f"# Floors of `small` (12 × 768, L = {L}, vocabulary {V}) at {a.tflops:.0f} TFLOP/s and {a.tbps} TB/s\n")
print("| what | FLOPs | fewest bytes | compute floor | memory floor | floor |")
print("|---|---:|---:|---:|---:|---:|")
t_c, t_m = step_flops / peak, step_bytes / bw
print(f"| training step, BD3 block 4, batch {a.batch} × {L} (2L pass) | {step_flops / 1e12:.2f} T | {step_bytes / 1e9:.2f} GB | {ms(t_c)} | {ms(t_m)} | **{ms(max(t_c, t_m))}** = {a.batch * L / max(t_c, t_m) / 1e3:.0f} k tokens/s |")
print(f"|  of which attention (BD3 mask: {pairs / dense_pairs:.1%} of the 2L × 2L pairs) | {a.batch * layers * attn_total / 1e12:.2f} T | | | | |")
print(f"|  of which the output head (at the masked half of the x_t rows; {a.batch * head_all_rows / 1e12:.2f} T at every row) | {a.batch * head_total / 1e12:.2f} T | | | | |")

# Mix-scale step at block = L: x_t queries see all of x_t; clean queries see all of x_0.
pairs_L = 2 * L * L
step_L = a.batch * (layers * (lin_total + 4 * d * pairs_L * 4) + head_total)
print(f"| training step at block = L (mix-scale's other scale), batch {a.batch} | {step_L / 1e12:.2f} T | {step_bytes / 1e9:.2f} GB | {ms(step_L / peak)} | {ms(t_m)} | **{ms(max(step_L / peak, t_m))}** |")

# ---- sampling ---------------------------------------------------------------------------------------
def call(batch, new_tokens, context, head_rows):
    """One denoiser call: `new_tokens` query tokens per sequence against `context` keys."""
    flops = batch * (layers * (linear_flops(new_tokens) + 4 * d * new_tokens * context) + 2 * head_rows * d * V)
    kv = batch * layers * 2 * context * d * 2  # the bf16 KV cache read
    return flops, params * 2 + kv  # every weight read once per call (bf16)


print()
print("| sampling, per denoiser call | FLOPs | fewest bytes | floor |")
print("|---|---:|---:|---:|")
rows = []
for batch in (1, 64):
    f, m = call(batch, 4, L // 2, 4)
    draft = max(f / peak, m / bw)
    # Global refine of 25 %: first-hitting reveals one of 256 tokens per call, each call a
    # full L-token pass (no cache inside the block), the head only at the remasked positions.
    fr, mr = call(batch, L, L, 256)
    refine = max(fr / peak, mr / bw)
    print(f"| draft (block 4, KV cache of ≈ L/2, head at 4 rows), batch {batch} | {f / 1e9:.1f} G | {m / 1e6:.0f} MB | {draft * 1e6:.1f} µs |")
    print(f"| global refine step (L = {L} tokens, head at 256 rows), batch {batch} | {fr / 1e9:.0f} G | {mr / 1e6:.0f} MB | {refine * 1e3:.2f} ms |")
    rows.append((batch, draft, refine))
print()
print("| sampling, one 1024-token sample, first-hitting | draft (1024 calls) | refine γ = 0.25 (256 calls) | samples/s floor |")
print("|---|---:|---:|---:|")
for batch, draft, refine in rows:
    t = 1024 * draft + 256 * refine
    print(f"| batch {batch} | {1024 * draft * 1e3:.1f} ms | {256 * refine * 1e3:.1f} ms | {batch / t:.1f} |")
