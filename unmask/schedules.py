"""Noise schedules (math only) and the grid of clipped training ranges.

`alpha(t)` is the probability that a token is still clean at time t (alpha(0) = 1, alpha(1) ~ 0);
the MDLM/BD3-LM NELBO weight is `w(t) = -alpha'(t) / (1 - alpha(t))` (Sahoo et al. 2024).
A schedule owns no sampling step: training and decoding both read it.

Clipped ("data-driven") schedules (BD3-LM, Arriola et al. 2025) train on t ~ U[beta, omega]; the
candidates are intervals of widths 0.5..0.9 (step 0.05) with starts on a 0.05 grid inside [0, 1].
ALGORITHMS.md counts 36 such intervals; the construction as written gives 63, which is what we
use (grid and widths are configurable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogLinear:
    """alpha(t) = 1 - (1 - eps) t: the mask rate grows linearly in t; w(t) = 1/t."""

    eps: float = 1e-3

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1 - self.eps))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1 / t


@dataclass(frozen=True)
class LinearSigma:
    """alpha(t) = exp(-sigma(t)), sigma linear from 0 to sigma_max; w(t) = sigma_max / expm1(sigma)."""

    sigma_max: float = 20.0

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.sigma_max * t)

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return -self.sigma_max * torch.exp(-self.sigma_max * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_max / torch.expm1(self.sigma_max * t)


@dataclass(frozen=True)
class Cosine:
    """alpha(t) = cos(pi t / 2); w(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2))."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(math.pi / 2 * t)

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return -math.pi / 2 * torch.sin(math.pi / 2 * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return -self.alpha_prime(t) / (1 - self.alpha(t))


NoiseSchedule = LogLinear | LinearSigma | Cosine

SCHEDULES = {"loglinear": LogLinear, "linear": LinearSigma, "cosine": Cosine}


def build_schedule(name: str, eps: float) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return LogLinear(eps) if name == "loglinear" else SCHEDULES[name]()


def stratified_times(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    """n times in [lo, hi], one per stratum of width (hi - lo)/n, in random order: [n]."""
    u = (torch.arange(n) + torch.rand(n, generator=generator)) / n
    return lo + (hi - lo) * u[torch.randperm(n, generator=generator)]


def clip_candidates(widths: tuple[float, ...], step: float) -> list[tuple[float, float]]:
    """All intervals [beta, beta + width] inside [0, 1] with beta on a grid of `step`, plus the
    full range [0, 1] (BD3-LM's grid: widths 0.5..0.9 by 0.1, starts every 0.05: 35 + 1 = 36)."""
    out = []
    for w in widths:
        n = int(round((1.0 - w) / step + 1e-9))
        out.extend((round(i * step, 6), round(i * step + w, 6)) for i in range(n + 1))
    return out if (0.0, 1.0) in out else [*out, (0.0, 1.0)]
