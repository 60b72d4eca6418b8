"""Shared forwards: the model calls of many decode lanes at one step, run as few forward passes.

Each lane of the serving engine is an ordinary decode (`decode_batch` -> `generate()`, the loop
`unmask sample` runs) over its own rows, running in a greenlet. It sees the model through a
`LaneModel`: a call that can share a forward suspends the lane (the greenlet switches to the
engine with a `Call`), and the engine resumes it with the call's output once every lane has
reached its next call. Calls of one round are grouped into buckets (`buckets`) and each bucket
runs as one forward (`run_shared`):

- no cache: the rows are right-padded to the bucket's longest call and the padding is hidden by a
  key mask, so a row's positions stay 0..n-1 and the padded keys add exact zeros to its attention
  sums (the invariant attention sums keys in chunks of absolute positions);
- a KV cache (our backbones: block-causal and causal exact caches, the Fast-dLLM caches): the
  calls' caches are seen through one `RaggedCache`, each row at its own position with its own
  committed length, its keys at their absolute positions and the rest masked;
- token calls and embedding calls (soft inputs) share a forward as embeddings (the model embeds
  tokens itself first, the same computation).

So a row's output in a shared forward equals its output alone, bit for bit, wherever the models'
inference ops are batch-invariant (`models/invariant`: CPU inference); the engine's exactness tests
check it on every model kind. Calls that cannot share a forward run alone, each in its round:
other keyword arguments (DiffusionGemma's decoder pass), the pretrained adapter with a cache (its
transformers cache takes one position per call) or with a shifted block-causal family (its next-
position logits are read off the last input position), and any call off the invariant path (CUDA,
whose kernels are not covered by the construction). They still wait for their round, so every
lane advances a step per round whatever its calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import greenlet
import numpy as np
import torch

from unmask.models import invariant
from unmask.models.denoiser import Denoiser, DenoiserOutput
from unmask.models.kv_cache import KVCache, RaggedCache
from unmask.models.transformer import Transformer

SPREAD = 2.0  # cached calls share a padded forward when the widest is at most this many times as wide


class ForwardCost:
    """What an uncached forward of `rows` rows of `width` positions costs on this machine, fitted to the
    engine's own: `seconds = fixed + per_position * rows * width + per_pair * rows * width^2` (the
    GEMMs grow with the positions, a canvas's attention with its query-key pairs), by least squares
    over the recent forwards (exponentially weighted; of the fits with and without each growth term,
    the closest one whose coefficients are all >= 0). It decides whether a call pads into a wider
    forward or runs in a forward of its own: padding a call of r rows from width w to W costs
    `per_position * r (W - w) + per_pair * r (W^2 - w^2)`, a forward of its own costs `fixed` (a
    small model on a CPU is dominated by the fixed cost and pads freely; a compute-bound one, or one
    whose attention dominates, pads little)."""

    DECAY = 0.98
    TERMS = ((0, 1, 2), (0, 1), (0, 2))  # fixed, per_position, per_pair: the full fit, and without one

    def __init__(self, fixed: float = 1e-3, per_position: float = 1e-6, per_pair: float = 0.0):
        self.prior = (fixed, per_position, per_pair)
        self.xx = np.zeros((3, 3))  # weighted sums of x x^T, x = (1, rows * width, rows * width^2)
        self.xy = np.zeros(3)
        self.yy = self.n = 0.0
        self._fit: tuple[float, float, float] | None = None  # solved once per observation

    def observe(self, rows: int, width: int, seconds: float) -> None:
        x = np.array([1.0, rows * width, rows * width * width])
        self.xx = self.DECAY * self.xx + np.outer(x, x)
        self.xy = self.DECAY * self.xy + x * seconds
        self.yy = self.DECAY * self.yy + seconds * seconds
        self.n = self.DECAY * self.n + 1
        self._fit = None

    @property
    def fit(self) -> tuple[float, float, float]:
        """(fixed, per_position, per_pair) seconds, all >= 0; the prior until the forwards vary."""
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    def _solve(self) -> tuple[float, float, float]:
        if self.n < 2.5:
            return self.prior
        scale = np.sqrt(np.diag(self.xx)).clip(1e-30)  # columns of comparable size
        xx, xy = self.xx / np.outer(scale, scale), self.xy / scale
        best, out = np.inf, None
        for terms in self.TERMS:
            t = list(terms)
            sub = xx[np.ix_(t, t)]
            if np.linalg.cond(sub) > 1e10:  # the forwards do not vary in these terms
                continue
            coef = np.linalg.solve(sub, xy[t])
            residual = self.yy - 2 * coef @ xy[t] + coef @ sub @ coef  # weighted squared error
            if (coef[1:] >= 0).all() and residual < best:
                best, out = residual, np.zeros(3)
                out[t] = coef / scale[t]
        if out is None:
            return self.prior
        return float(max(0.0, out[0])), float(out[1]), float(out[2])

    def pads(self, rows: int, width: int, into: int) -> bool:
        """Whether padding `rows` rows of `width` positions to `into` costs less than a forward of
        their own."""
        fixed, per_position, per_pair = self.fit
        padded = per_position * rows * (into - width) + per_pair * rows * (into * into - width * width)
        return padded <= fixed


@dataclass(eq=False)
class Call:
    """One lane's model call, waiting for its round's shared forward."""

    tokens: torch.Tensor | None  # [b, n]
    embeds: torch.Tensor | None  # [b, n, D]
    cache: KVCache | None
    key_mask: torch.Tensor | None  # [b, >= S]
    own: dict | None = None  # a call no forward can share: these arguments, run alone in its round

    def __post_init__(self) -> None:  # read many times while the round's calls are bucketed
        given = self.own if self.own is not None else {"tokens": self.tokens, "embeds": self.embeds}
        self.given = given.get("tokens") if given.get("tokens") is not None else given.get("embeds")
        self.rows, self.width = self.given.shape[:2] if self.given is not None else (0, 0)


def shareable(model: Denoiser, kwargs: dict) -> bool:
    """Whether a call `model(**kwargs)` may run inside a shared forward (see the module note)."""
    if set(kwargs) - {"tokens", "embeds", "cache", "key_mask"}:
        return False
    given = kwargs.get("tokens")
    given = kwargs.get("embeds") if given is None else given
    if given is None or not invariant.active(given):
        return False
    cache = kwargs.get("cache")
    if isinstance(model, Transformer):
        return cache is None or type(cache) is KVCache
    from unmask.models.pretrained.adapter import HFDenoiser

    if isinstance(model, HFDenoiser):
        shifted_next = model.family.shift and model.cfg.attention == "block_causal"
        return cache is None and not shifted_next
    return False


class LaneModel:
    """The model as a lane sees it: every call goes to the engine (the lane's parent greenlet), which
    runs it in the round's shared forwards, or alone in its round when it cannot share one (so a lane
    of such calls still takes turns with the others, step by step); every other attribute is the
    model's own."""

    def __init__(self, model: Denoiser):
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, tokens: torch.Tensor | None = None, **kwargs) -> DenoiserOutput:
        if tokens is not None:
            kwargs["tokens"] = tokens
        if shareable(self._model, kwargs):
            call = Call(
                kwargs.get("tokens"), kwargs.get("embeds"), kwargs.get("cache"), kwargs.get("key_mask")
            )
        else:
            call = Call(None, None, None, None, own=kwargs)
        return greenlet.getcurrent().parent.switch(call)


def buckets(calls: list[Call], max_tokens: int, cost: ForwardCost | None = None) -> list[list[Call]]:
    """The calls of one round grouped into forwards: cached and uncached calls apart; within each,
    widest first, a call joins the open forward while the padded positions stay within `max_tokens`
    (a call wider than that runs alone) and its padding is worth it: uncached (canvases), while the
    positions it wastes cost less than a forward of its own (`cost`, fitted to uncached forwards);
    cached, while the forward is at most SPREAD times its width (a cached forward's cost is mostly its
    keys, not its width: block steps share a width, a prompt's prefill does not pad them)."""
    cost = cost or ForwardCost()
    out = [[c] for c in calls if c.own is not None]
    calls = [c for c in calls if c.own is None]
    for cached in (False, True):
        group = sorted((c for c in calls if (c.cache is not None) == cached), key=lambda c: -c.width)
        current: list[Call] = []
        for call in group:
            if current:
                width = current[0].width
                rows = sum(c.rows for c in current) + call.rows
                worth = width <= SPREAD * call.width if cached else cost.pads(call.rows, call.width, width)
                if worth and rows * width <= max_tokens:
                    current.append(call)
                    continue
                out.append(current)
            current = [call]
        if current:
            out.append(current)
    return out


def run_shared(model: Denoiser, calls: list[Call]) -> list[DenoiserOutput]:
    """One forward for `calls` (one bucket); each call's output, as it would be alone."""
    if len(calls) == 1:
        c = calls[0]
        if c.own is not None:
            return [model(**c.own)]
        return [model(tokens=c.tokens, embeds=c.embeds, cache=c.cache, key_mask=c.key_mask)]
    N = max(c.width for c in calls)
    mixed = any(c.embeds is not None for c in calls)
    parts, masks = [], []
    cache = RaggedCache([(c.cache, c.width) for c in calls]) if calls[0].cache is not None else None
    S = cache.length if cache is not None else N
    for c in calls:
        x = model.embed(c.tokens) if mixed and c.embeds is None else c.given  # [b, n] | [b, n, D]
        pad = N - c.width
        if pad:
            filler = (
                x.new_zeros((c.rows, pad) + x.shape[2:])
                if x.dim() == 3
                else x.new_full((c.rows, pad), model.mask_id)
            )
            x = torch.cat([x, filler], dim=1)
        parts.append(x)
        keys = torch.zeros(c.rows, S, dtype=torch.bool, device=x.device)  # the keys its own call holds
        if c.key_mask is not None:
            n = min(S, c.key_mask.shape[1], c.width if cache is None else S)
            keys[:, :n] = c.key_mask[:, :n].bool()
        else:
            keys[:, : c.width if cache is None else S] = True
        masks.append(keys)
    key_mask = torch.cat(masks)  # [B, S]
    if cache is not None:
        key_mask &= cache.key_mask()  # each row's committed prefix and its own new positions
    elif key_mask.all():  # canvases of one width, none padded: the unmasked path, as each alone
        key_mask = None  # (a key mask costs every attention call a pass or three over its scores)
    given = torch.cat(parts)
    out = model(
        **({"embeds": given} if given.dim() == 3 else {"tokens": given}), cache=cache, key_mask=key_mask
    )
    results, row = [], 0
    for c in calls:
        rows = slice(row, row + c.rows)
        # contiguous, as a call of its own returns them (later ops then take the same kernels)
        logits, hidden = out.logits[rows, : c.width].contiguous(), out.hidden[rows, : c.width].contiguous()
        results.append(DenoiserOutput(logits, hidden, None))
        row += c.rows
    return results
