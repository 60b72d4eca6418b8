"""Proposals: which token each masked position would become. Distribution processing (temperature,
top-k, top-p) and the draw (greedy or categorical by inverse CDF in float64) are separate steps.

Work happens on the masked positions only, flattened to `[N, V]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Proposal(NamedTuple):
    tokens: torch.Tensor  # [N] proposed token per masked position
    probs: torch.Tensor  # [N, V] float64 model distribution (temperature 1, [MASK] excluded)
    kept_mass: torch.Tensor  # [N] raw probability mass kept by top-k / top-p (1 when neither)


def model_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """[N, V] float64 probabilities with the [MASK] token excluded (SUBS)."""
    logits = logits.double().index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
    return logits.softmax(-1)


def truncate(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero all but the top-k tokens and the smallest nucleus holding `top_p` mass (not renormalised)."""
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    return probs


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row of `probs` [N, V] (need not sum to 1) with uniforms `u` [N]."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


@dataclass(frozen=True)
class Greedy:
    """argmax of the (truncated) model distribution."""

    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, probs: torch.Tensor, u: torch.Tensor) -> Proposal:
        kept = truncate(probs, self.top_k, self.top_p)
        return Proposal(kept.argmax(-1), probs, kept.sum(-1))


@dataclass(frozen=True)
class Sample:
    """Categorical draw from the tempered, truncated distribution (float64)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, probs: torch.Tensor, u: torch.Tensor) -> Proposal:
        kept = truncate(probs, self.top_k, self.top_p)
        mass = kept.sum(-1)
        if self.temperature != 1.0:
            kept = kept ** (1.0 / self.temperature)
        return Proposal(categorical(kept, u), probs, mass)
