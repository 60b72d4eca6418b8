"""Refreshers: what the distributions become between two commit rounds of one full forward.

With `rounds` R > 1, `generate()` makes R commit rounds per full forward (ADJUST, Bansal &
Sanghavi 2025, decodes K = R tokens per forward). Between two rounds the logits of the call's
view are refreshed for the tokens just committed:

- `Marginal`: not at all. The R decisions come from one forward's marginals (ADJUST's baseline).
- `FullModel`: a new forward of the model, through the same call (cache included). Exact, so
  R rounds with it equal R steps of one round each, token for token; it saves nothing and is
  the check's reference.
- `SamplerRefresh`: ADJUST's sampler layer, from the previous hidden states; one small block
  instead of the whole model.

The view is what the model's call saw on bidirectional models (the canvas, or the slice a
Fast-dLLM cache feeds); on block-causal models it is the active block, whose hidden states
already carry the exact prefix, so a refresh is the same with and without the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from unmask.models import invariant


class View(NamedTuple):
    """A call's output for canvas positions [start, start + n)."""

    start: int
    logits: torch.Tensor  # [B, n, V]
    hidden: torch.Tensor  # [B, n, D] final-norm hidden states


class Refresher(Protocol):
    cost: str  # "none" (nothing runs), "pass" (a refresh pass, counted apart), "forward" (an NFE)

    def __call__(self, model, tokens: torch.Tensor, view: View, again: Callable[[], View]) -> View:
        """tokens [B, n]: the view's tokens after the last commit round; `again` reruns the call."""
        ...


@dataclass(frozen=True)
class Marginal:
    """No refresh: the next round reuses the same logits (the marginal baseline)."""

    cost = "none"

    def __call__(self, model, tokens: torch.Tensor, view: View, again: Callable[[], View]) -> View:
        return view


@dataclass(frozen=True)
class FullModel:
    """A fresh forward of the model: exact, as expensive as another step."""

    cost = "forward"

    def __call__(self, model, tokens: torch.Tensor, view: View, again: Callable[[], View]) -> View:
        return again()


@dataclass(frozen=True)
class SamplerRefresh:
    """ADJUST's sampler layer: h_j = sampler(embed(x^(j)), h_{j-1}); logits through the base head."""

    sampler: torch.nn.Module  # compared by identity: two plans with the same sampler may share a batch
    cost = "pass"

    def __call__(self, model, tokens: torch.Tensor, view: View, again: Callable[[], View]) -> View:
        hidden = self.sampler(model, tokens, view.hidden, start=view.start)
        return View(view.start, invariant.linear(model.head, hidden), hidden)


def build_refresher(name: str, sampler=None) -> Refresher:
    """`none` | `model` | `sampler` (which needs a trained ADJUST `sampler`)."""
    if (name == "sampler") != (sampler is not None):
        raise ValueError(
            "--decode.refresh sampler needs --sampler DIR (a trained ADJUST sampler), and "
            "--sampler needs --decode.refresh sampler (the adjust preset)"
        )
    return {"none": Marginal, "model": FullModel}[name]() if sampler is None else SamplerRefresh(sampler)
