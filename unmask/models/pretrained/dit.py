"""MDLM / BD3-LM's DiT backbone as a variant of our own `Transformer`.

The released OWT checkpoints (Sahoo et al. 2024; Arriola et al. 2025) are pre-norm transformers
with LayerNorm, a GELU-tanh MLP with biases, an output bias, and adaLN modulation driven by a
time embedding. With `time_conditioning: false` that embedding is computed at sigma = 0 for every
input, so each modulation is a constant and folds into the weights exactly:

    LN(x) * w * (1 + scale) + shift      ->  LayerNorm with weight w (1 + scale), bias shift
    x + gate * f(...)                    ->  f's output layer scaled by gate

Attention (fused `(three h d)` qkv, rotate-half rotary on q and k, no biases) is ours unchanged, so
the KV cache, masks and the vectorized BD3-LM training pass all come with it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unmask.config import ModelConfig
from unmask.models import invariant
from unmask.models.pretrained.families import PretrainedError, require
from unmask.models.transformer import Transformer

FREQ_DIM = 256  # the timestep embedder's sinusoid width


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant.linear(self.down, invariant.gelu(invariant.linear(self.up, x), approximate="tanh"))


class DiT(Transformer):
    """`Transformer` with LayerNorms (bias), GELU-tanh MLPs (biases) and a biased LM head."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, mask_id: int):
        super().__init__(cfg, vocab_size, mask_id)
        D = cfg.dim
        for block in self.blocks:
            block.norm1, block.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
            block.mlp = GeluMLP(D, int(cfg.mlp_ratio * D))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, vocab_size)


def dit_config(raw: dict[str, Any], where: str, attention: str, block_size: int) -> ModelConfig:
    require(
        raw,
        where,
        "time_conditioning",
        {False},
        "a time-conditioned DiT cannot be folded into a time-free denoiser",
    )
    require(raw, where, "causal", {False}, "an autoregressive DiT is not a diffusion model")
    return ModelConfig(
        attention=attention,
        block_size=max(block_size, 1),
        dim=raw["hidden_dim"],
        n_layers=raw["n_blocks"],
        n_heads=raw["n_heads"],
        mlp="gelu",
        mlp_ratio=4.0,
    )


def _modulation(tensors: dict[str, torch.Tensor], prefix: str, c: torch.Tensor | None, n: int):
    """The n chunks of `prefix.adaLN_modulation(c)` (c = None: no adaLN, identity modulation)."""
    if c is None:
        return None
    return (
        F.linear(
            c,
            tensors[prefix + "adaLN_modulation.weight"].float(),
            tensors[prefix + "adaLN_modulation.bias"].float(),
        )
    ).chunk(n)


class _Used(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


# checkpoint entries that are not weights of the denoiser: BD3-LM's clipped-schedule buffers, rope
NOT_WEIGHTS = {"sampling_eps_min", "sampling_eps_max", "rotary_emb.inv_freq"}


def fold(tensors: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (`backbone.*`) -> `DiT` state dict, adaLN folded at sigma = 0."""
    t = _Used({k.removeprefix("backbone."): v for k, v in tensors.items()})
    c = None
    if "sigma_map.mlp.0.weight" in t:
        half = FREQ_DIM // 2
        freq = torch.cat([torch.ones(half), torch.zeros(half)])  # [cos(0 * f), sin(0 * f)]
        h = F.silu(F.linear(freq, t["sigma_map.mlp.0.weight"].float(), t["sigma_map.mlp.0.bias"].float()))
        c = F.silu(F.linear(h, t["sigma_map.mlp.2.weight"].float(), t["sigma_map.mlp.2.bias"].float()))
    try:
        out = {"tok_embed.weight": t["vocab_embed.embedding"]}
        for i in range(n_layers):
            p = f"blocks.{i}."
            mod = _modulation(t, p, c, 6)
            zero = torch.zeros(t[p + "norm1.weight"].shape[0])
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod or (
                zero,
                zero,
                zero + 1,
                zero,
                zero,
                zero + 1,
            )
            dtype = t[p + "attn_qkv.weight"].dtype
            out[p + "norm1.weight"] = (t[p + "norm1.weight"].float() * (1 + scale_a)).to(dtype)
            out[p + "norm1.bias"] = shift_a.to(dtype)
            out[p + "attn.qkv.weight"] = t[p + "attn_qkv.weight"]
            out[p + "attn.out.weight"] = (gate_a[:, None] * t[p + "attn_out.weight"].float()).to(dtype)
            out[p + "norm2.weight"] = (t[p + "norm2.weight"].float() * (1 + scale_m)).to(dtype)
            out[p + "norm2.bias"] = shift_m.to(dtype)
            out[p + "mlp.up.weight"], out[p + "mlp.up.bias"] = t[p + "mlp.0.weight"], t[p + "mlp.0.bias"]
            out[p + "mlp.down.weight"] = (gate_m[:, None] * t[p + "mlp.2.weight"].float()).to(dtype)
            out[p + "mlp.down.bias"] = (gate_m * t[p + "mlp.2.bias"].float()).to(dtype)
        p = "output_layer."
        mod = _modulation(t, p, c, 2)
        D = t[p + "norm_final.weight"].shape[0]
        shift, scale = mod or (torch.zeros(D), torch.zeros(D))
        dtype = t[p + "linear.weight"].dtype
        out["norm.weight"] = (t[p + "norm_final.weight"].float() * (1 + scale)).to(dtype)
        out["norm.bias"] = shift.to(dtype)
        out["head.weight"], out["head.bias"] = t[p + "linear.weight"], t[p + "linear.bias"]
    except KeyError as e:
        raise PretrainedError(
            f"missing weight backbone.{e.args[0]} (an MDLM/BD3-LM checkpoint has "
            "backbone.vocab_embed, backbone.blocks.*, backbone.output_layer.*)"
        ) from e
    unused = sorted(k for k in tensors if k.removeprefix("backbone.") not in t.used | NOT_WEIGHTS)
    if unused:
        blocks = sorted({int(k.split(".")[2]) for k in unused if k.startswith("backbone.blocks.")})
        hint = (
            f" (config.json has n_blocks={n_layers}; the checkpoint also holds blocks {blocks})"
            if blocks
            else ""
        )
        raise PretrainedError(
            f"the checkpoint has weights the model its config.json describes does not use{hint}: {unused[:5]}"
        )
    return out
