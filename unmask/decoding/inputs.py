"""Input policies: what still-masked positions feed the model at each call.

`BinaryInputs` feeds the [MASK] embedding (every decoder's default); `SoftInputs` feeds the
soft-masking blend (Hersche et al., ICLR 2026) built by the model's `SoftMask` module from the
previous call's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class BinaryInputs:
    """Still-masked positions feed the [MASK] embedding: the model sees the tokens as they are."""

    def __call__(self, model, tokens: torch.Tensor, start: int, state) -> dict[str, torch.Tensor]:
        return {"tokens": tokens}


class InputPolicy(Protocol):
    def __call__(self, model, tokens: torch.Tensor, start: int, state) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class SoftInputs:
    """Decoding input policy: masked positions of the active window are fed the soft blend built
    from the previous call's output (the first call of a block is binary). `schedule` scales w_s:
    none (1), linear (the window's masked fraction), stepwise (1 while more than half is masked)."""

    schedule: str = "none"

    def scale(self, masked_fraction: torch.Tensor) -> torch.Tensor:
        """Per-row factor on w_s from the row's masked fraction of the window [B]."""
        if self.schedule == "linear":
            return masked_fraction
        if self.schedule == "stepwise":
            return (masked_fraction > 0.5).float()
        return torch.ones_like(masked_fraction)

    def __call__(self, model, tokens: torch.Tensor, start: int, state) -> dict[str, torch.Tensor]:
        """tokens [B, T] fed at canvas positions [start, start + T)."""
        if state is None or state.prev_logits is None or model.soft_mask is None:
            return {"tokens": tokens}
        lo, hi = state.window
        a, b = max(lo, start), min(hi, start + tokens.shape[1])  # the window's part of the slice
        in_window = tokens[:, a - start : b - start] == model.mask_id  # [B, b - a]
        soft = torch.zeros_like(tokens, dtype=torch.bool)
        soft[:, a - start : b - start] = in_window
        logits = state.prev_logits[:, a - lo : b - lo][in_window]  # [N, V], row-major like soft
        fraction = (state.tokens[:, lo:hi] == model.mask_id).float().mean(-1)  # [B] per row
        scale = self.scale(fraction)[in_window.nonzero(as_tuple=True)[0]]  # [N]
        return {"embeds": model.soft_mask.blend(model.tok_embed, tokens, soft, logits, model.mask_id, scale)}


@dataclass(frozen=True)
class Renoised:
    """Uniform-noise models (DiffusionGemma): the window's undecided positions feed the state's
    noisy canvas (accepted draws, fresh uniform tokens elsewhere) and the model gets the previous
    step's processed logits as its self-conditioning input (none at a block's first step)."""

    def __call__(self, model, tokens: torch.Tensor, start: int, state) -> dict[str, torch.Tensor]:
        """tokens [B, W]: the window itself (the block's step call with its KV cache)."""
        if state is None or state.noisy is None or state.window != (start, start + tokens.shape[1]):
            raise ValueError("re-noised inputs are the active window's, after the decoder's block opening")
        fed = torch.where(tokens == model.mask_id, state.noisy, tokens)
        return {"tokens": fed, "decode": True, "self_conditioning": state.prev_logits}
