"""Selectors: which masked positions of the active window become tokens at this step.

Counted selectors commit `n = ceil(R / (S - k))` positions at step k of S with R still masked, so
a block always finishes within its budget (remainder to early steps, as LLaDA). The ancestral
selector draws the count from the noise schedule (MDLM); with `normalize` it applies the global
normalization of top-k + Glob / Conv (Seo et al. 2025): candidate weights `g_i * m_i` (gate times
kept top-k mass) rescaled by `s_norm = #masked / sum_i g_i m_i`, so the total unmask mass of the
step equals MDLM's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from unmask.schedules import NoiseSchedule


class SelectContext(NamedTuple):
    confidence: torch.Tensor  # [B, W] gated confidence, -inf where not masked
    gate: torch.Tensor  # [B, W] Conv gate (ones without Conv)
    kept_mass: torch.Tensor  # [B, W] proposal's kept probability mass
    masked: torch.Tensor  # [B, W] bool, eligible positions
    step: torch.Tensor | int  # k [B] long: steps its block has taken (an int: every row's)
    steps: torch.Tensor | int  # S [B] long: its block's budget
    u: torch.Tensor  # [B, W] float64 uniforms (per-row streams)


def per_row(x: torch.Tensor | int, masked: torch.Tensor) -> torch.Tensor:
    """A step counter as [B] long: a tensor as it is, an int for every row of `masked` [B, W]."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.full(masked.shape[:1], x, dtype=torch.long, device=masked.device)


def step_count(
    masked: torch.Tensor, step: torch.Tensor | int, steps: torch.Tensor | int, counts: str = "remaining"
) -> torch.Tensor:
    """[B] positions to commit at step k of S (per row). `remaining`: ceil(R / (S - k)) of the R
    masks left; `block`: the window's width W split evenly over the S steps, the remainder to the
    first steps (SDAR's and LLaDA2's fixed schedule; `top_n` takes at most the masks left)."""
    step, steps = per_row(step, masked), per_row(steps, masked)
    if counts == "block":
        W = masked.shape[-1]
        return torch.div(W, steps, rounding_mode="floor") + (step < W % steps).long()
    left = steps - step
    return torch.div(masked.sum(-1) + left - 1, left, rounding_mode="floor")


def reverse_times(step, steps, eps: float = 0.0):
    """(t, s): consecutive points k, k + 1 of linspace(1, eps, S + 1) (floats, or float64 [B] for
    [B] step counters: the same IEEE operations in the same order)."""
    if isinstance(step, torch.Tensor):
        step, steps = step.double(), steps.double()
    return 1 - (1 - eps) * step / steps, 1 - (1 - eps) * (step + 1) / steps


def top_n(values: torch.Tensor, n: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """[B, W] bool: the n[b] largest `values` of each row among `eligible` positions."""
    values = values.masked_fill(~eligible, -math.inf)
    order = values.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(values.shape[-1], device=values.device).expand_as(order)
    )
    return (ranks < n[:, None]) & eligible


@dataclass(frozen=True)
class Ancestral:
    """MDLM reverse step t -> s: each masked position unmasks with prob (a_s - a_t) / (1 - a_t)."""

    schedule: NoiseSchedule
    normalize: bool = False
    eps: float = 0.0  # the time grid's end (Dream's `origin`: 1e-3)

    until_done = False
    random = True

    @property
    def needs_proposals(self) -> bool:  # the global normalization reads the kept top-k mass
        return self.normalize

    def weights(self, c: SelectContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmask weight A_i [B, W] (0 off the masked set) and the stay-masked weight 1 - a_s.
        A position unmasks with prob A_i / (A_i + 1 - a_s), one categorical draw over
        {candidates, stay} as in the reference. Without gate/normalization A_i = a_s - a_t."""
        t, s = reverse_times(per_row(c.step, c.masked), per_row(c.steps, c.masked), self.eps)  # [B] float64
        a_t, a_s = self.schedule.alpha(t)[:, None], self.schedule.alpha(s)[:, None]  # [B, 1]
        weight = c.gate.double()
        if self.normalize:
            weight = weight * c.kept_mass.double()
            total = (weight * c.masked).sum(-1, keepdim=True)
            weight = weight * c.masked.sum(-1, keepdim=True) / total.clamp_min(1e-300)
        return weight * (a_s - a_t) * c.masked, 1 - a_s

    def __call__(self, c: SelectContext) -> torch.Tensor:
        last = per_row(c.step, c.masked) == per_row(c.steps, c.masked) - 1  # [B] s = 0: all left decoded
        if last.all():
            return c.masked
        unmask, stay = self.weights(c)
        drawn = (c.u < unmask / (unmask + stay)) & c.masked
        return torch.where(last[:, None], c.masked, drawn)


@dataclass(frozen=True)
class FirstHitting:
    """Uniformly random masked positions, n per step (one per call when S equals the block)."""

    counts: str = "remaining"  # `step_count`'s rule
    needs_proposals = False
    until_done = False
    random = True

    def __call__(self, c: SelectContext) -> torch.Tensor:
        return top_n(c.u, step_count(c.masked, c.step, c.steps, self.counts), c.masked)


@dataclass(frozen=True)
class Sequential:
    """The n leftmost masked positions (SDAR's `sequential`)."""

    counts: str = "remaining"
    needs_proposals = False
    until_done = False
    random = False

    def __call__(self, c: SelectContext) -> torch.Tensor:
        leftmost = -torch.arange(c.masked.shape[-1], dtype=torch.float64, device=c.masked.device)
        return top_n(
            leftmost.expand(c.masked.shape), step_count(c.masked, c.step, c.steps, self.counts), c.masked
        )


@dataclass(frozen=True)
class TopN:
    """The n most confident positions (LLaDA low-confidence remasking, SDAR's static one; Conv
    ranked)."""

    counts: str = "remaining"
    needs_proposals = True
    until_done = False
    random = False

    def __call__(self, c: SelectContext) -> torch.Tensor:
        return top_n(c.confidence, step_count(c.masked, c.step, c.steps, self.counts), c.masked)


@dataclass(frozen=True)
class Threshold:
    """Fast-dLLM: every position with confidence > tau, and at least the most confident one
    (`floor="one"`: a block is decoded until done, whatever the step budget) or at least the
    count the step budget implies (`floor="budget"`; with `counts="block"` SDAR's
    `low_confidence_dynamic` and LLaDA2's threshold rule)."""

    tau: float
    floor: str = "one"
    counts: str = "remaining"
    needs_proposals = True
    random = False

    @property
    def until_done(self) -> bool:
        return self.floor == "one"

    def __call__(self, c: SelectContext) -> torch.Tensor:
        if self.floor == "one":
            minimum = top_n(c.confidence, c.masked.any(-1).long(), c.masked)
        else:
            minimum = TopN(self.counts)(c)
        return ((c.confidence > self.tau) & c.masked) | minimum


@dataclass(frozen=True)
class DreamSchedule:
    """Dream's `diffusion_generate` count: with t, s = consecutive points of linspace(1, eps, S+1),
    commit int(R (1 - s/t)) of the R masked positions (all of them at the last step): the most
    confident, or with `alg_temp` > 0 a draw without replacement from softmax(confidence / alg_temp)
    (Gumbel-top-k on the per-row uniforms)."""

    eps: float = 1e-3
    alg_temp: float = 0.0
    needs_proposals = True
    until_done = False

    @property
    def random(self) -> bool:  # alg_temp > 0 samples the positions
        return self.alg_temp > 0

    def __call__(self, c: SelectContext) -> torch.Tensor:
        remaining = c.masked.sum(-1)
        step, steps = per_row(c.step, c.masked), per_row(c.steps, c.masked)
        t, s = reverse_times(step, steps, self.eps)  # [B] float64
        # Dream's int(R * (1 - s / t)): the factor a Python float, so the product is float32
        n = torch.floor(remaining * (1 - s / t).float()).long()
        n = torch.where(step >= steps - 1, remaining, n)
        keys = c.confidence
        if self.alg_temp > 0:
            gumbel = -torch.log(-torch.log(c.u.clamp(1e-300, 1 - 1e-16)))
            scaled = c.confidence.masked_fill(~c.masked, -math.inf) / self.alg_temp
            keys = torch.log_softmax(scaled, -1) + gumbel
        return top_n(keys, n, c.masked)
