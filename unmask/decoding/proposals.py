"""Proposals: which token each masked position would become. The model distribution is processed
(top-k, top-p, temperature) into candidates, then drawn from: greedy, or categorical by inverse
CDF in float64 (a float32 Gumbel draw is known to sharpen the distribution).

Work happens on the flattened masked positions only (`[N, V]` logits). A `Distribution` keeps the
float32 logits and their log-normaliser; full probabilities are built only when a score asks for
them, and top-k / top-p candidates are found on the logits, so a step costs two or three passes
over `[N, V]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from unmask.models import invariant


@dataclass(frozen=True)
class Distribution:
    """The model's distribution at N positions: logits [N, V] ([MASK] at -inf); its log-normaliser
    `lse` [N] and `probs` are computed when first read."""

    logits: torch.Tensor  # [N, V] float32
    # probabilities (and what scores read of them) as the families' own loops compute them:
    # torch.softmax in float32, Dream's entropy sum p log(p + 1e-10) (`Processed` proposals)
    softmax: bool = False

    @classmethod
    def from_logits(
        cls, logits: torch.Tensor, mask_id: int | None, *, copy: bool = True, softmax: bool = False
    ) -> Distribution:
        """SUBS: the [MASK] token is excluded (mask_id None: models whose reference loops keep it,
        e.g. LLaDA). Works on a float32 copy of `logits`, or on `logits` itself with copy=False
        (for a fresh float32 tensor the caller gives away)."""
        x = logits.to(torch.float32, copy=copy)
        if mask_id is not None:
            x[..., mask_id] = -torch.inf
        return cls(x, softmax)

    @cached_property
    def lse(self) -> torch.Tensor:
        """[N] float32 log-normaliser."""
        x = self.logits
        m = x.max(-1, keepdim=True).values
        # exp-sum-log is cheaper than torch.logsumexp on CPU; the sum is each row's own (batch-invariant)
        return invariant.row_sum((x - m).exp_()).log_().add_(m.squeeze(-1))

    @cached_property
    def probs(self) -> torch.Tensor:
        """[N, V] float32 probabilities (built on first use)."""
        if self.softmax:
            return torch.softmax(self.logits, -1)
        return (self.logits - self.lse[:, None]).exp_()

    def entropy(self) -> torch.Tensor:
        """H(p) [N] float64: -sum p * (logit - lse) in float32 over [N, V]; excluded tokens
        ([MASK], p = 0, logit -inf) contribute 0."""
        probs = self.probs
        if self.softmax:  # Dream's `sample_tokens`: sum p log(p + 1e-10), in place (one [N, V] buffer)
            return -invariant.row_sum(probs.add(1e-10).log_().mul_(probs)).double()
        plogp = torch.where(probs > 0, probs * (self.logits - self.lse[:, None]), 0.0)
        return -invariant.row_sum(plogp).double()

    def prob_of(self, logit: torch.Tensor) -> torch.Tensor:
        """Probabilities (float64) of the given logits [N] or [N, k]."""
        lse = self.lse if logit.dim() == 1 else self.lse[:, None]
        return (logit.double() - lse.double()).exp()


class Proposal(NamedTuple):
    tokens: torch.Tensor  # [N] proposed token per masked position
    dist: Distribution  # the model distribution (temperature 1, [MASK] excluded)
    kept_mass: torch.Tensor  # [N] float64 probability mass kept by top-k / top-p (1 when neither)


def in_nucleus(p_desc: torch.Tensor, top_p: float, rule: str = "crossing") -> torch.Tensor:
    """[N, C] bool: which of the probabilities `p_desc` (sorted descending) the nucleus keeps.
    `crossing`: the mass before the token is <= top_p (the token that crosses top_p is kept);
    `within`: the inclusive cumulative mass is <= top_p, and always the first token (BD3-LM)."""
    cum = p_desc.cumsum(-1)
    if rule == "crossing":
        return (cum - p_desc) <= top_p
    keep = cum <= top_p
    keep[:, 0] = True
    return keep


def candidates(
    dist: Distribution, top_k: int, top_p: float, rule: str = "crossing"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidate probabilities `[N, C]` float64 (not renormalised; zero = excluded) and their token
    ids (None when the candidates are the whole vocabulary in order)."""
    V = dist.logits.shape[-1]
    if top_k and top_k < V:
        logit, ids = dist.logits.topk(top_k, dim=-1)  # sorted, descending
    elif top_p < 1.0:
        return _nucleus(dist, top_p, rule)
    else:
        return dist.probs.double(), None
    p = dist.prob_of(logit)
    if top_p < 1.0:  # nucleus of the model's distribution, within the top k
        p = torch.where(in_nucleus(p, top_p, rule), p, 0.0)
    return p, ids


def sorted_desc(x: torch.Tensor) -> torch.Tensor:
    """[N, V] values sorted descending. On CPU numpy's SIMD sort is ~15x faster than torch.sort,
    and no argsort is needed."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=-1)[:, ::-1]))
    return x.sort(dim=-1, descending=True).values


def _nucleus(dist: Distribution, top_p: float, rule: str) -> tuple[torch.Tensor, None]:
    """Top-p candidates over the vocabulary `[N, V]` float64, zero outside the nucleus. Only the
    sorted *values* are needed: they give the smallest kept logit tau, and the nucleus is
    {logit >= tau} (ties at tau are all kept)."""
    x = dist.logits
    desc = sorted_desc(x)
    keep = in_nucleus(dist.prob_of(desc), top_p, rule)
    tau = desc.gather(-1, (keep.sum(-1, keepdim=True) - 1).clamp_min(0))  # [N, 1] smallest kept logit
    return torch.where(x >= tau, dist.prob_of(x), 0.0), None


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
    return p.sum(-1)


@dataclass(frozen=True)
class Greedy:
    """argmax of the model distribution (top-k / top-p only change the reported kept mass)."""

    top_k: int = 0
    top_p: float = 1.0
    rule: str = "crossing"  # top-p's rule (`in_nucleus`)
    keeps_mask = True  # with a family's full softmax (subs = False), [MASK] may rank first
    random = False  # reads no uniforms

    def __call__(self, dist: Distribution, u: torch.Tensor) -> Proposal:
        if not self.top_k and self.top_p >= 1.0:
            return Proposal(dist.logits.argmax(-1), dist, _mass(dist.logits, None))
        p, ids = candidates(dist, self.top_k, self.top_p, self.rule)
        return Proposal(_tokens(p.argmax(-1), ids), dist, _mass(p, ids))


@dataclass(frozen=True)
class Sample:
    """Categorical draw from the tempered, truncated distribution (float64)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    rule: str = "crossing"
    keeps_mask = False  # a sampled [MASK] would be no decision at all
    random = True

    def __call__(self, dist: Distribution, u: torch.Tensor) -> Proposal:
        p, ids = candidates(dist, self.top_k, self.top_p, self.rule)
        mass = _mass(p, ids)
        if self.temperature != 1.0:
            p = p ** (1.0 / self.temperature)
        return Proposal(_tokens(categorical(p, u), ids), dist, mass)


def top_k_logits(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, V] logits with -inf below the k-th largest (ties with it kept)."""
    if not k or k >= x.shape[-1]:
        return x
    kth = x.topk(k, dim=-1).values[:, -1:]
    return x.masked_fill(x < kth, -torch.inf)


def top_p_logits(x: torch.Tensor, top_p: float, rule: str = "crossing") -> torch.Tensor:
    """[N, V] logits with -inf outside the nucleus of softmax(x) (`in_nucleus`'s rule)."""
    if top_p >= 1.0:
        return x
    desc = sorted_desc(x)
    p_desc = torch.softmax(desc.double(), -1)
    keep = in_nucleus(p_desc, top_p, rule)
    tau = desc.gather(-1, (keep.sum(-1, keepdim=True) - 1).clamp_min(0))
    return x.masked_fill(x < tau, -torch.inf)


@dataclass(frozen=True)
class Processed:
    """The families' own proposal (Dream's `sample_tokens`, SDAR's and LLaDA2's
    `sample_with_temperature_topk_topp`): logits / temperature, truncated (`dream`: top-p then
    top-k; `sdar`: top-k, then top-p of the renormalised top-k), softmax; the token is its argmax
    (greedy) or a draw, and the proposal's distribution *is* this processed one, so scores read it.
    Greedy `sdar` takes the argmax and the untruncated softmax (LLaDA2 at temperature 0)."""

    order: str  # dream | sdar
    greedy: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    rule: str = "crossing"
    keeps_mask = True  # the references draw from the full softmax, [MASK] included (subs = False)

    @property
    def random(self) -> bool:
        return not self.greedy

    def __call__(self, dist: Distribution, u: torch.Tensor) -> Proposal:
        ones = _mass(dist.logits, None)
        if self.greedy and self.order == "sdar":
            return Proposal(dist.logits.argmax(-1), Distribution(dist.logits, softmax=True), ones)
        x = dist.logits
        if (self.greedy or self.temperature == 1.0) and not self.top_k and self.top_p >= 1.0:
            processed = Distribution(x, softmax=True)  # nothing to process: the same logits
            tokens = x.argmax(-1) if self.greedy else categorical(processed.probs.double(), u)
            return Proposal(tokens, processed, ones)
        if not self.greedy and self.temperature != 1.0:
            x = x / self.temperature
        if self.order == "dream":
            x = top_k_logits(top_p_logits(x, self.top_p, self.rule), self.top_k)
        else:
            x = top_p_logits(top_k_logits(x, self.top_k), self.top_p, self.rule)
        processed = Distribution.from_logits(x, None, copy=x is dist.logits, softmax=True)
        if self.greedy:
            return Proposal(processed.logits.argmax(-1), processed, ones)
        return Proposal(categorical(processed.probs.double(), u), processed, ones)
