"""The ADJUST sampler layer (Bansal & Sanghavi, 2025) and its files.

One bidirectional block of the base architecture between RMSNorms refreshes the still-masked
positions' distributions after each decoded token, reusing the frozen base model's embedding and
LM head. A trained sampler is saved as `sampler.safetensors` + `sampler.json`, the latter naming
the base checkpoint and the digest of its weights, so it is never paired with another base.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from unmask.config import ModelConfig, replace
from unmask.models import invariant
from unmask.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_strict,
    resolve_checkpoint,
)
from unmask.models.transformer import Block, Denoiser


class AdjustSampler(nn.Module):
    """The sampler layer: one bidirectional block of the base architecture between two RMSNorms."""

    def __init__(self, base_cfg: ModelConfig):
        super().__init__()
        D = base_cfg.dim
        self.norm_embed, self.norm_prior, self.norm_out = nn.RMSNorm(D), nn.RMSNorm(D), nn.RMSNorm(D)
        self.proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(replace(base_cfg, attention="bidirectional", dropout=0.0))
        # on a block-causal base the sampler attends within each block of L' (the view decoding
        # refreshes is the active block: its hidden states already carry the exact prefix)
        self.block_size = base_cfg.block_size if base_cfg.attention == "block_causal" else 0
        # the block's own rotary frequencies (its heads are dim / n_heads wide, whatever the base's)
        head = D // base_cfg.n_heads
        inv_freq = 1.0 / base_cfg.rope_base ** (torch.arange(0, head, 2).float() / head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        # a zero gain on the output norm: the untrained sampler returns the prior hidden state, so it
        # equals the no-refresh (marginal) baseline exactly and training can only improve on it
        nn.init.zeros_(self.norm_out.weight)

    def forward(
        self, base: Denoiser, tokens: torch.Tensor, prior: torch.Tensor, start: int = 0
    ) -> torch.Tensor:
        """tokens [B, n] (the current state at canvas positions [start, start + n)), prior [B, n, D]
        -> refreshed hidden [B, n, D]."""
        x = torch.cat([self.norm_embed(base.embed(tokens)), self.norm_prior(prior)], dim=-1)
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        angles = positions[:, None].float() * self.inv_freq[None, :]
        mask = None
        if self.block_size:  # [n, n] same block of L'
            block = positions // self.block_size
            mask = block[:, None] == block[None, :]
        h = self.block(invariant.linear(self.proj, x), angles.cos(), angles.sin(), mask, None, 0)
        return self.norm_out(h) + prior


def _weights_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def base_identity(base_path: str | Path) -> tuple[Path, str, str]:
    """(directory, weights label, digest) of the base a sampler belongs to: a run's checkpoint
    (its EMA or raw weights file, hashed) or a pretrained directory (see `pretrained.load.digest`)."""
    from unmask.models.pretrained.load import digest, is_pretrained_dir

    if is_pretrained_dir(base_path):
        path = Path(base_path).expanduser()
        return path, "pretrained", digest(path)
    base_ckpt = resolve_checkpoint(base_path)
    ema = base_ckpt / "ema.safetensors"
    weights = ema if ema.is_file() else base_ckpt / "model.safetensors"  # what load_checkpoint uses
    return base_ckpt, weights.name, _weights_digest(weights)


def save_sampler(sampler: AdjustSampler, base_path: str | Path, out: Path, *, K: int) -> None:
    base, weights, digest = base_identity(base_path)
    tmp = out / f".sampler.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in sampler.state_dict().items()}, str(tmp))
    os.replace(tmp, out / "sampler.safetensors")
    meta = {"k": K, "base": str(base), "base_weights": weights, "base_digest": digest}
    (out / "sampler.json").write_text(json.dumps(meta, indent=2))


def load_sampler(path: str | Path, base_path: str | Path) -> tuple[AdjustSampler, Denoiser, int]:
    """The sampler at `path` and the base checkpoint it was trained on (a mismatch is an error)."""
    path = Path(path)
    if not (path / "sampler.json").is_file():
        raise CheckpointError(f"no ADJUST sampler at {path} (expected sampler.json and sampler.safetensors)")
    meta = json.loads((path / "sampler.json").read_text())
    loaded = load_checkpoint(base_path)
    digest = base_identity(base_path)[2]
    if digest != meta["base_digest"]:
        raise CheckpointError(
            f"the sampler at {path} was trained for base {meta['base']} "
            f"(weights {meta['base_digest']}), not for {base_path} (weights {digest})"
        )
    sampler = AdjustSampler(loaded.model.cfg)
    load_state_dict_strict(sampler, path / "sampler.safetensors")
    return sampler.eval(), loaded.model, meta["k"]
