#!/usr/bin/env python3
"""Builds the fixtures of `did import bd3lm`'s tests with the reference
implementation itself: a tiny random-weight `BD3LM` from kuleshov-group/bd3lms
(`models/hf/modeling_bd3lm.py`, imported from a checkout given on the command
line, never copied here), saved as its Hugging Face repositories are
(config.json + model.safetensors, and the same weights as pytorch_model.bin),
and its raw logits in the three ways the reference runs the network:

- `logits_train`: the vectorised training pass over x_t ⊕ x_0 (2L tokens, the
  block-diffusion mask), logits of the x_t half;
- `logits_sample`: `sample_mode=True` without a KV cache over x_0 (L tokens,
  block-causal);
- `logits_full`: the same weights with `cross_attn=False` (the block-1024
  pre-train's setting: plain bidirectional attention).

    git clone https://github.com/kuleshov-group/bd3lms /tmp/bd3lms
    python3 scripts/make-bd3lm-fixtures.py /tmp/bd3lms [OUT]

OUT defaults to did-cli/tests/fixtures/bd3lm-tiny. Needs torch, transformers,
einops and safetensors (here: pip install torch transformers einops). The
output is committed; rerun only to change the fixture.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

if len(sys.argv) < 2:
    sys.exit(__doc__)
sys.path.insert(0, str(Path(sys.argv[1]) / "models"))
from hf import BD3LM, BD3LMConfig  # noqa: E402  (the reference's own code)

out = Path(sys.argv[2] if len(sys.argv) > 2 else "did-cli/tests/fixtures/bd3lm-tiny")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
VOCAB, L, BLOCK = 64, 16, 4
MASK = VOCAB - 1
common = dict(
    vocab_size=VOCAB, model_length=L, hidden_dim=32, cond_dim=24, n_blocks=2, n_heads=4,
    dropout=0.1, time_conditioning=False, adaln=True, causal=False, attn_backend="sdpa",
    var_min=True, sampling_eps_min=0.05, sampling_eps_max=0.8, return_dict=False,
)
config = BD3LMConfig(block_size=BLOCK, cross_attn=True, **common)
model = BD3LM(config).eval()
# Random weights everywhere: the reference zero-initialises adaLN and the head,
# which would hide every layout mistake in them.
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
model.save_pretrained(out, safe_serialization=True)
torch.save(model.state_dict(), out / "pytorch_model.bin")

x0 = torch.tensor([[5, 9, 1, 0, 33, 33, 62, 17, 8, 2, 40, 41, 42, 7, 11, 3],
                   [62, 61, 1, 0, 0, 0, 9, 20, 30, 50, 11, 22, 33, 44, 55, 6]])
# x_t: a different set of masked places per block, including a fully masked block.
noise = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0],
                      [0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
xt = torch.where(noise, torch.full_like(x0, MASK), x0)
sigma = torch.zeros(2)
with torch.no_grad():
    logits_train = model(torch.cat([xt, x0], dim=1), sigma)
    logits_sample = model(x0, sigma, sample_mode=True)
    full = BD3LM(BD3LMConfig(block_size=L, cross_attn=False, **common)).eval()
    full.load_state_dict(model.state_dict(), strict=True)
    logits_full = full(x0, sigma)
    if isinstance(logits_train, tuple):
        logits_train, logits_sample, logits_full = (
            logits_train[0], logits_sample[0], logits_full[0])
save_file({
    "x0": x0.to(torch.int32).contiguous(),
    "xt": xt.to(torch.int32).contiguous(),
    "logits_train": logits_train.float().contiguous(),
    "logits_sample": logits_sample.float().contiguous(),
    "logits_full": logits_full.float().contiguous(),
}, str(out / "expected.safetensors"))
(out / "README.md").write_text(
    f"A tiny random-weight `BD3LM` (vocabulary {VOCAB} with [MASK] = {MASK}, L = {L}, block {BLOCK}, 2 blocks × 32,\n"
    "4 heads, cond_dim 24) built with kuleshov-group/bd3lms' own `models/hf/modeling_bd3lm.py` by\n"
    f"`scripts/make-bd3lm-fixtures.py` (transformers {transformers.__version__}, torch {torch.__version__}).\n"
    "`model.safetensors` and `pytorch_model.bin` hold the same weights. `expected.safetensors`: `x0`, `xt`\n"
    "[2, 16] i32 and the reference's raw logits [2, 16, 64] f32: `logits_train` (x_t ⊕ x_0, training mask),\n"
    "`logits_sample` (sample_mode, block-causal over x_0), `logits_full` (cross_attn = false, bidirectional).\n"
)
print(json.dumps({"out": str(out), "transformers": transformers.__version__, "torch": torch.__version__}))
