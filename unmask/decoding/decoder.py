"""Decoder = propose -> score -> select, plus what still-masked positions feed the model.

`step()` turns the model's logits for the active window into the next state. It knows nothing
about blocks, caches or model kinds: that is `generate()`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from unmask.decoding.proposals import Proposal, model_probs
from unmask.decoding.scores import TokenProb
from unmask.decoding.selectors import SelectContext
from unmask.decoding.state import DecodeState


class ProposalPolicy(Protocol):
    def __call__(self, probs: torch.Tensor, u: torch.Tensor) -> Proposal: ...


class Selector(Protocol):
    def __call__(self, c: SelectContext) -> torch.Tensor: ...


@dataclass(frozen=True)
class BinaryInputs:
    """Still-masked positions feed the [MASK] embedding: the model sees the tokens as they are."""

    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": tokens}


@dataclass(frozen=True)
class Decoder:
    propose: ProposalPolicy
    score: TokenProb
    select: Selector
    inputs: BinaryInputs = BinaryInputs()

    def step(self, state: DecodeState, logits: torch.Tensor, u_token: torch.Tensor,
             u_select: torch.Tensor) -> DecodeState:
        """logits [B, W, V] for the window; u_* [B, W] float64 per-row uniforms."""
        lo, hi = state.window
        window = state.tokens[:, lo:hi]  # [B, W]
        masked = state.masked  # [B, W]
        where = masked.nonzero(as_tuple=True)
        proposal = self.propose(model_probs(logits[where], state.mask_id), u_token[where])  # [N], [N, V]
        gate = self.score.gate(state.tokens != state.mask_id)  # [B, T] or None
        gate = torch.ones_like(window, dtype=torch.float32) if gate is None else gate[:, lo:hi]
        confidence = torch.zeros(window.shape, dtype=torch.float64, device=window.device)
        confidence[where] = self.score(proposal)
        confidence = torch.where(masked, confidence * gate, -torch.inf)
        kept_mass = torch.zeros_like(confidence)
        kept_mass[where] = proposal.kept_mass
        chosen = self.select(SelectContext(confidence, gate, kept_mass, masked, state.step,
                                           state.steps, u_select))
        proposed = window.clone()
        proposed[where] = proposal.tokens
        tokens = state.tokens.clone()
        tokens[:, lo:hi] = torch.where(chosen, proposed, window)
        return state.advance(tokens=tokens, step=state.step + 1)
