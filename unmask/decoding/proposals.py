"""Proposals: which token each masked position would become. The model distribution is processed
(top-k, top-p, temperature) into candidates, then drawn from: greedy, or categorical by inverse
CDF in float64 (a float32 Gumbel draw is known to sharpen the distribution). The softmax itself is
float32 (relative error ~1e-7); candidates are promoted to float64 before the draw.

Work happens on the flattened masked positions only (`[N, V]`), and top-k draws touch only the k
candidates, so a step costs a few passes over `[N, V]` at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Proposal(NamedTuple):
    tokens: torch.Tensor  # [N] proposed token per masked position
    probs: torch.Tensor  # [N, V] float32 model distribution (temperature 1, [MASK] excluded)
    kept_mass: torch.Tensor  # [N] raw probability mass kept by top-k / top-p (1 when neither)


def model_probs(logits: torch.Tensor, mask_id: int, *, copy: bool = True) -> torch.Tensor:
    """[N, V] float32 probabilities with the [MASK] token excluded (SUBS). Computed in place on a
    copy of `logits`, or on `logits` itself with copy=False (for a fresh float32 tensor)."""
    x = logits.to(torch.float32, copy=copy)
    x[..., mask_id] = -torch.inf
    x -= x.max(-1, keepdim=True).values
    x.exp_()
    x /= x.sum(-1, keepdim=True)
    return x


def candidates(probs: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidate probabilities `[N, C]` (not renormalised; zero = excluded) and their token ids
    (None when the candidates are the whole vocabulary in order)."""
    if top_k and top_k < probs.shape[-1]:
        p, ids = probs.topk(top_k, dim=-1)  # sorted, descending
    elif top_p < 1.0:
        p, ids = probs.sort(dim=-1, descending=True)
    else:
        return probs, None
    if top_p < 1.0:  # nucleus: the smallest prefix holding top_p of the mass
        p = p.double()
        before = p.cumsum(-1) - p
        p = torch.where(before < top_p, p, 0.0)
    return p, ids


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row of `probs` [N, C] (need not sum to 1) with uniforms `u` [N]."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _tokens(choice: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def _mass(p: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:  # float64 [N]
    if ids is None:
        return torch.ones(p.shape[0], dtype=torch.float64, device=p.device)
    return p.sum(-1, dtype=torch.float64)


@dataclass(frozen=True)
class Greedy:
    """argmax of the model distribution (top-k / top-p only change the reported kept mass)."""

    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, probs: torch.Tensor, u: torch.Tensor) -> Proposal:
        p, ids = candidates(probs, self.top_k, self.top_p)
        return Proposal(_tokens(p.argmax(-1), ids), probs, _mass(p, ids))


@dataclass(frozen=True)
class Sample:
    """Categorical draw from the tempered, truncated distribution (float64)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, probs: torch.Tensor, u: torch.Tensor) -> Proposal:
        p, ids = candidates(probs, self.top_k, self.top_p)
        mass = _mass(p, ids)
        if self.temperature != 1.0:
            p = p ** (1.0 / self.temperature)
        return Proposal(_tokens(categorical(p.double(), u), ids), probs, mass)
