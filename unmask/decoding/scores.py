"""Scores: how sure the model is about each proposal, and the Conv locality gate.

Confidences work on the flattened masked positions (`Proposal`, [N]). `Conv` (Seo et al. 2025,
convolutional decoding) wraps any confidence with the gate `s_i = tanh(u_i)`, where `u_i` counts
the decoded positions (prompt included) in a centred window of odd width K around i: almost a 0/1
"is a decoded token within (K-1)/2 of i?", so the eligible band grows outward from the context,
on both sides when there is context on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unmask.decoding.proposals import Proposal


@dataclass(frozen=True)
class TokenProb:
    """Probability of the proposed token (LLaDA low-confidence remasking)."""

    random = False  # True: the confidence is a uniform draw the decoder fills in (see `Random`)

    def __call__(self, p: Proposal) -> torch.Tensor:
        if p.dist.softmax:  # the family's own float32 softmax
            return p.dist.probs.gather(-1, p.tokens[:, None]).squeeze(-1).double()
        return p.dist.prob_of(p.dist.logits.gather(-1, p.tokens[:, None]).squeeze(-1))

    def gate(self, decoded: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor | None:
        return None


@dataclass(frozen=True)
class MaxProb(TokenProb):
    """Largest probability at the position (Dream `maskgit_plus`)."""

    def __call__(self, p: Proposal) -> torch.Tensor:
        if p.dist.softmax:
            return p.dist.probs.max(-1).values.double()
        return p.dist.prob_of(p.dist.logits.max(-1).values)


@dataclass(frozen=True)
class Margin(TokenProb):
    """Top-1 minus top-2 probability (Dream `topk_margin`)."""

    def __call__(self, p: Proposal) -> torch.Tensor:
        if p.dist.softmax:
            top = p.dist.probs.topk(2, dim=-1).values
            return (top[:, 0] - top[:, 1]).double()
        top = p.dist.prob_of(p.dist.logits.topk(2, dim=-1).values)
        return top[:, 0] - top[:, 1]


@dataclass(frozen=True)
class NegEntropy(TokenProb):
    """-H(p) of the position's distribution (Dream `entropy`)."""

    def __call__(self, p: Proposal) -> torch.Tensor:
        return -p.dist.entropy()


@dataclass(frozen=True)
class Conv:
    """Conv decoding: `inner` confidence, plus the locality gate tanh(u_i) over a window `kernel`."""

    inner: TokenProb
    kernel: int

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"Conv kernel must be a positive odd width, got {self.kernel}")

    @property
    def random(self) -> bool:
        return self.inner.random

    def __call__(self, p: Proposal) -> torch.Tensor:
        return self.inner(p)

    def gate(self, decoded: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """decoded [B, T] bool -> s [B, T] = tanh(#decoded within the centred window), or with
        `window` (lo, hi) only its positions [B, hi - lo] (the counts read the K // 2 positions on
        either side, so the same sums). A row with no decoded token at all (no context) is not
        gated."""
        T, r = decoded.shape[1], self.kernel // 2
        lo, hi = window if window is not None else (0, T)
        a, b = max(0, lo - r), min(T, hi + r)  # the positions the window's counts read
        ones = torch.ones(1, 1, self.kernel, dtype=torch.float32, device=decoded.device)
        u = F.conv1d(decoded[:, a:b].float()[:, None], ones, padding=r)[:, 0, lo - a : hi - a]  # [B, hi - lo]
        s = torch.tanh(u)
        return torch.where(decoded.any(-1, keepdim=True), s, torch.ones_like(s))


@dataclass(frozen=True)
class Random(TokenProb):
    """A uniform draw per position (LLaDA's `random` remasking): the decoder fills it from the
    per-row uniforms, so it is reproducible by seed."""

    random = True

    def __call__(self, p: Proposal) -> torch.Tensor:
        return torch.zeros(p.tokens.shape, dtype=torch.float64, device=p.tokens.device)
