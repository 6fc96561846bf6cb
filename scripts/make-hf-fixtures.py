#!/usr/bin/env python3
"""Builds the Hugging Face fixtures of `did import`'s tests with the real
`transformers` code: a tiny random-weight GPT2LMHeadModel saved as HF saves
it (config.json + model.safetensors), and its logits on fixed inputs.

    python3 scripts/make-hf-fixtures.py [OUT]   (default did-cli/tests/fixtures/hf-gpt2-tiny)

Needs torch, transformers and safetensors (the GPU host has them; here:
pip install torch transformers). The output is committed; rerun only to
change the fixture.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

out = Path(sys.argv[1] if len(sys.argv) > 1 else "did-cli/tests/fixtures/hf-gpt2-tiny")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
config = transformers.GPT2Config(
    vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=299, eos_token_id=299,
)
model = transformers.GPT2LMHeadModel(config).eval()
# Random weights everywhere (the default init leaves biases and LayerNorms trivial).
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.2)
model.save_pretrained(out, safe_serialization=True)
ids = torch.tensor([[7, 42, 299, 0, 13, 13, 250, 101, 5, 77, 1, 2, 3, 64, 128, 256],
                    [299, 298, 1, 0, 0, 0, 9, 90, 180, 270, 11, 22, 33, 44, 55, 66]], dtype=torch.int32)
with torch.no_grad():
    logits = model(ids.long()).logits.float().contiguous()
save_file({"input_ids": ids, "logits": logits}, str(out / "expected.safetensors"))
(out / "README.md").write_text(
    "A tiny random-weight `GPT2LMHeadModel` (vocabulary 300, 64 positions, 2 layers × 32, 4 heads) made by\n"
    f"`scripts/make-hf-fixtures.py` with transformers {transformers.__version__} and torch {torch.__version__},\n"
    "and its logits on two fixed sequences (`expected.safetensors`: `input_ids` [2, 16] i32, `logits`\n"
    "[2, 16, 300] f32), for `did import gpt2`'s test.\n"
)
print(json.dumps({"out": str(out), "transformers": transformers.__version__, "torch": torch.__version__}))
