"""The did model, its training step and its draft -> remask -> refine sampler, in PyTorch.

This is the baseline of issue #6: what a careful PyTorch user would write for the same
model (BD3-LM's DiT, docs/bd3lm.md section 3) and the same samplers, so that `did --backend cuda`
can be timed against it on the same GPU. It reads did checkpoints (the parameter names are
BD3-LM's), and `check_against_did.py` checks its logits against did's CPU backend.

Attention comes in two flavours, as in BD3-LM: `sdpa` (a materialised boolean mask passed to
`scaled_dot_product_attention`) and `flex` (FlexAttention with a block mask built from the same
predicate, which skips empty tiles). Training runs under bf16 autocast with f32 weights, like
BD3-LM's Lightning `bf16` precision; sampling runs in bf16 or f32 with f64 nucleus + Gumbel.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TIME_EMBEDDING_DIM = 256


@dataclass
class Config:
    layers: int
    hidden: int
    heads: int
    context: int
    vocab_size: int = 50258
    mask_id: int = 50257
    cond_dim: int = 128
    dropout: float = 0.1
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def mlp_hidden(self) -> int:
        return 4 * self.hidden

    @staticmethod
    def preset(name: str, **overrides) -> "Config":
        shapes = {"tiny": (4, 256, 4, 256), "small": (12, 768, 12, 1024)}
        if name not in shapes:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(shapes)}")
        layers, hidden, heads, context = shapes[name]
        return Config(layers, hidden, heads, context, **overrides)


# ---- masks --------------------------------------------------------------------------------------


def bd3_allows(q, k, seq_len: int, block: int):
    """BD3-LM's 2L x 2L training mask (docs/bd3lm.md 2.2) as a predicate on index tensors."""
    q_clean, k_clean = q >= seq_len, k >= seq_len
    q_blk = (q - seq_len * q_clean) // block
    k_blk = (k - seq_len * k_clean) // block
    diagonal = (q_blk == k_blk) & (q_clean == k_clean)
    offset_causal = ~q_clean & k_clean & (k_blk < q_blk)
    block_causal = q_clean & k_clean & (k_blk <= q_blk)
    return diagonal | offset_causal | block_causal


def bd3_dense_mask(seq_len: int, block: int, device) -> torch.Tensor:
    i = torch.arange(2 * seq_len, device=device)
    return bd3_allows(i[:, None], i[None, :], seq_len, block)


def block_causal_dense_mask(n: int, block: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i[None, :] // block) <= (i[:, None] // block)


# ---- the model ----------------------------------------------------------------------------------


def rope_tables(positions: torch.Tensor, head_dim: int, base: float):
    """cos, sin of the GPT-NeoX rotate-half layout: [len, head_dim] each, in f32."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, D]; cos/sin: [N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight-only LayerNorm computed in f32 (docs/bd3lm.md 3)."""
    return (F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * weight.float()).to(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        h = c.hidden
        self.norm1 = nn.Parameter(torch.ones(h))
        self.attn_qkv = nn.Linear(h, 3 * h, bias=False)
        self.attn_out = nn.Linear(h, h, bias=False)
        self.norm2 = nn.Parameter(torch.ones(h))
        self.mlp = nn.Sequential(nn.Linear(h, c.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(c.mlp_hidden, h))
        self.adaLN_modulation = nn.Linear(c.cond_dim, 6 * h)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)
        self.c = c


class Dit(nn.Module):
    """BD3-LM's DiT with constant conditioning (sigma = 0)."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.vocab_embed = nn.Embedding(c.vocab_size, c.hidden)
        nn.init.kaiming_uniform_(self.vocab_embed.weight, a=math.sqrt(5))
        self.sigma_map = nn.Sequential(nn.Linear(TIME_EMBEDDING_DIM, c.cond_dim), nn.SiLU(), nn.Linear(c.cond_dim, c.cond_dim))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm_final = nn.Parameter(torch.ones(c.hidden))
        self.head = nn.Linear(c.hidden, c.vocab_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.final_adaLN = nn.Linear(c.cond_dim, 2 * c.hidden)
        nn.init.zeros_(self.final_adaLN.weight)
        nn.init.zeros_(self.final_adaLN.bias)

    # -- loading --

    def load_did(self, tensors: dict[str, torch.Tensor], ema: bool = False) -> None:
        """Loads did's (= BD3-LM's) parameter names; `ema` picks the `ema/` copy."""
        rename = {"vocab_embed.embedding": "vocab_embed.weight", "output_layer.linear.weight": "head.weight",
                  "output_layer.linear.bias": "head.bias", "output_layer.norm_final.weight": "norm_final",
                  "output_layer.adaLN_modulation.weight": "final_adaLN.weight",
                  "output_layer.adaLN_modulation.bias": "final_adaLN.bias"}
        state = {}
        prefix = "ema/" if ema else ""
        for name, t in tensors.items():
            if "/" in name and not name.startswith(prefix or "\0"):
                continue
            name = name[len(prefix):]
            name = rename.get(name, name)
            name = name.replace(".norm1.weight", ".norm1").replace(".norm2.weight", ".norm2")
            name = name.replace("sigma_map.mlp.", "sigma_map.")
            state[name] = t
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")

    # -- the pass --

    def conditioning(self) -> torch.Tensor:
        half = TIME_EMBEDDING_DIM // 2
        e = torch.cat([torch.ones(half), torch.zeros(half)]).to(self.head.weight.device, self.head.weight.dtype)
        return F.silu(self.sigma_map(e))

    def forward(self, tokens, positions, attend, kv_cache=None, commit=False, out_rows=None):
        """Logits of `tokens` [B, N] at `positions` [N].

        `attend(q, k, v)` is the attention (it owns the mask). With `kv_cache` (a `KvCache`),
        keys and values of the cache's committed prefix are prepended; `commit` appends this
        call's keys and values to it. `out_rows` picks the rows the head computes: [B, R] indices,
        an int for the first rows (the x_t half of the 2L pass), or a boolean [B, R] mask over
        the first R rows (the logits come back flat, [rows marked, V]).
        """
        c = self.c
        heads, hd = c.heads, c.hidden // c.heads
        cond = self.conditioning()
        x = self.vocab_embed(tokens)
        cos, sin = rope_tables(positions, hd, c.rope_base)
        b, n, _ = x.shape
        for i, blk in enumerate(self.blocks):
            shift1, scale1, gate1, shift2, scale2, gate2 = blk.adaLN_modulation(cond).chunk(6, dim=-1)
            h = modulate(layer_norm(x, blk.norm1, c.norm_eps), shift1, scale1)
            qkv = blk.attn_qkv(h).view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
            q, k, v = apply_rope(qkv[0], cos, sin), apply_rope(qkv[1], cos, sin), qkv[2]
            if kv_cache is not None:
                k_all, v_all = kv_cache.extend(i, k, v, commit)
            else:
                k_all, v_all = k, v
            a = attend(q, k_all, v_all).transpose(1, 2).reshape(b, n, c.hidden)
            x = x + gate1 * F.dropout(blk.attn_out(a), c.dropout, self.training)
            h = modulate(layer_norm(x, blk.norm2, c.norm_eps), shift2, scale2)
            x = x + gate2 * F.dropout(blk.mlp(h), c.dropout, self.training)
        if isinstance(out_rows, int):
            x = x[:, :out_rows]
        elif isinstance(out_rows, torch.Tensor) and out_rows.dtype == torch.bool:
            x = x[:, : out_rows.shape[1]][out_rows]
        elif out_rows is not None:
            x = torch.gather(x, 1, out_rows[..., None].expand(-1, -1, c.hidden))
        shift, scale = self.final_adaLN(cond).chunk(2, dim=-1)
        return self.head(modulate(layer_norm(x, self.norm_final, c.norm_eps), shift, scale))


class KvCache:
    """Per layer the keys and values of the committed clean prefix: [B, H, capacity, D]."""

    def __init__(self, c: Config, batch: int, capacity: int, device, dtype):
        hd = c.hidden // c.heads
        self.k = torch.zeros(c.layers, batch, c.heads, capacity, hd, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.pending = 0

    def extend(self, layer: int, k, v, commit: bool):
        n = k.shape[2]
        end = self.length + n
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        if commit and layer == self.k.shape[0] - 1:
            self.pending = n
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def finish_commit(self):
        self.length += self.pending
        self.pending = 0


# ---- attention ------------------------------------------------------------------------------------


def sdpa(mask=None):
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return attend


def flex_bd3(seq_len: int, block: int, device):
    """FlexAttention over the BD3 training mask; empty tiles are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q, k):
        return bd3_allows(q, k, seq_len, block)

    bm = create_block_mask(mask_mod, None, None, 2 * seq_len, 2 * seq_len, device=device)
    # Uncompiled, FlexAttention materialises the scores: compile it where a compiler exists.
    fused = torch.compile(flex_attention) if torch.device(device).type == "cuda" else flex_attention

    def attend(q, k, v):
        return fused(q, k, v, block_mask=bm)

    return attend


# ---- training ------------------------------------------------------------------------------------


def bd3_loss(model: Dit, x0: torch.Tensor, block: int, attend, generator=None, masked_head=False) -> torch.Tensor:
    """BD3-LM's NELBO for one batch (docs/bd3lm.md 1.3-1.7): a noise level t per block, each token
    masked with probability t (linear schedule), the 2L pass over x_t (+) x_0, SUBS
    log-probabilities, cross-entropy at the masked positions weighted by 1/t, mean over tokens.

    `masked_head` runs the head over the masked rows only (as did does): the same loss and
    gradients, since an unmasked row's weight is 0, for about half the head's work."""
    c = model.c
    b, n = x0.shape
    t = torch.rand(b, n // block, 1, device=x0.device, generator=generator).clamp_min(1e-3)
    t = t.expand(-1, -1, block).reshape(b, n)
    masked = torch.rand(b, n, device=x0.device, generator=generator) < t
    xt = torch.where(masked, torch.full_like(x0, c.mask_id), x0)
    positions = torch.arange(n, device=x0.device).repeat(2)
    if masked_head:
        logits = model(torch.cat([xt, x0], dim=1), positions, attend, out_rows=masked).float()
        logits[..., c.mask_id] = -1e6
        nll = F.cross_entropy(logits, x0[masked], reduction="none")
        return (nll / t[masked]).sum() / (b * n)
    logits = model(torch.cat([xt, x0], dim=1), positions, attend, out_rows=n).float()
    logits[..., c.mask_id] = -1e6
    nll = F.cross_entropy(logits.reshape(-1, c.vocab_size), x0.reshape(-1), reduction="none").view(b, n)
    return (nll * masked / t).sum() / (b * n)


# ---- sampling ------------------------------------------------------------------------------------


def nucleus_gumbel(logits: torch.Tensor, mask_id: int, top_p: float, generator=None):
    """Rows of logits -> (token, its nucleus probability), in f64 (docs/bd3lm.md 4.5-4.6)."""
    logits = logits.double()
    logits[..., mask_id] = -math.inf
    p = logits.softmax(-1)
    sorted_p, order = p.sort(-1, descending=True)
    keep = sorted_p.cumsum(-1) <= top_p
    keep[..., 0] = True
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    p = torch.zeros_like(p).scatter(-1, order, sorted_p)
    p = p / p.sum(-1, keepdim=True)
    u = torch.rand(p.shape, dtype=torch.float64, device=p.device, generator=generator)
    token = (p / (1e-10 - (u + 1e-10).log())).argmax(-1)
    return token, p.gather(-1, token[..., None])[..., 0]


@torch.no_grad()
def draft_refine(model: Dit, batch: int, length: int, draft_block: int = 4, remask_ratio: float = 0.25,
                 top_p: float = 0.9, bos: int = 50256, generator=None, refine=True, deadline=None):
    """Draft with block `draft_block` and a KV cache (first-hitting: one token per call),
    remask the `remask_ratio` least confident tokens by their snapshot confidence, then
    regenerate them with one global block (full attention, first-hitting). Returns the tokens
    [B, length] and {"draft": calls, "refine": calls, "finished": bool}; past `deadline` (a
    `time.perf_counter()` value) it stops at the next block boundary, unfinished."""
    c = model.c
    dev = model.head.weight.device
    dtype = model.head.weight.dtype
    x = torch.full((batch, length), c.mask_id, device=dev)
    x[:, 0] = bos
    confidence = torch.ones(batch, length, device=dev, dtype=torch.float64)
    cache = KvCache(c, batch, length, dev, dtype)
    rows = torch.arange(batch, device=dev)
    calls = {"draft": 0, "refine": 0, "finished": True}

    def out_of_time():
        if deadline is not None and time.perf_counter() > deadline:
            calls["finished"] = False
        return not calls["finished"]

    for start in range(0, length, draft_block):
        if out_of_time():
            return x, calls
        end = start + draft_block
        positions = torch.arange(start, end, device=dev)
        while True:
            masked = x[:, start:end] == c.mask_id
            if not masked.any():
                break
            # First-hitting: one masked position per sequence, uniformly at random.
            weights = masked.float() + 1e-9 * (~masked.any(-1, keepdim=True)).float()
            pick = torch.multinomial(weights, 1, generator=generator)
            logits = model(x[:, start:end], positions, sdpa(), kv_cache=cache, out_rows=pick)[:, 0]
            token, prob = nucleus_gumbel(logits, c.mask_id, top_p, generator)
            live = masked.gather(1, pick)[:, 0]
            col = start + pick[:, 0]
            x[rows, col] = torch.where(live, token, x[rows, col])
            confidence[rows, col] = torch.where(live, prob, confidence[rows, col])
            calls["draft"] += 1
        model(x[:, start:end], positions, sdpa(), kv_cache=cache, commit=True, out_rows=pick[:, :0])
        cache.finish_commit()
    if not refine:
        return x, calls
    # Remask the least confident tokens (BOS keeps confidence 1).
    k = int(remask_ratio * length)
    lowest = confidence.topk(k, dim=-1, largest=False).indices
    x.scatter_(1, lowest, c.mask_id)
    positions = torch.arange(length, device=dev)
    while not out_of_time():
        masked = x == c.mask_id
        if not masked.any():
            break
        weights = masked.float() + 1e-9 * (~masked.any(-1, keepdim=True)).float()
        pick = torch.multinomial(weights, 1, generator=generator)
        logits = model(x, positions, sdpa(), out_rows=pick)[:, 0]
        token, _ = nucleus_gumbel(logits, c.mask_id, top_p, generator)
        live = masked.gather(1, pick)[:, 0]
        col = pick[:, 0]
        x[rows, col] = torch.where(live, token, x[rows, col])
        calls["refine"] += 1
    return x, calls
