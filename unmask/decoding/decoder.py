"""Decoder = propose -> score -> select, plus what still-masked positions feed the model.

`step()` turns the model's logits for the active window into the next state. It knows nothing
about blocks, caches or model kinds: that is `generate()`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from unmask.decoding.inputs import BinaryInputs, InputPolicy
from unmask.decoding.proposals import Distribution, Greedy, Proposal
from unmask.decoding.rng import row_uniform
from unmask.decoding.scores import TokenProb
from unmask.decoding.selectors import SelectContext
from unmask.decoding.state import DecodeState


class ProposalPolicy(Protocol):
    random: bool  # draws (reads its uniforms); greedy proposals do not

    def __call__(self, dist: Distribution, u: torch.Tensor) -> Proposal: ...


class Selector(Protocol):
    needs_proposals: bool  # False: selection ignores proposals, so only chosen positions get one
    until_done: bool  # True: >= 1 commit per step, each block decoded until done (Fast-dLLM's threshold)
    random: bool  # reads its uniforms (policies without the attribute are taken to)

    def __call__(self, c: SelectContext) -> torch.Tensor: ...


def leftmost_sub_block(masked: torch.Tensor, width: int) -> torch.Tensor:
    """[B, W] masked -> the masked positions of each row's leftmost sub-block (of `width`, counted
    from the window's start) that has any (all of them with width 0)."""
    if not width or width >= masked.shape[-1]:
        return masked
    sub = torch.arange(masked.shape[-1], device=masked.device) // width  # [W] sub-block index
    first = torch.where(masked, sub, masked.shape[-1]).min(-1, keepdim=True).values  # [B, 1]
    return masked & (sub == first)


@dataclass(frozen=True)
class Decoder:
    propose: ProposalPolicy
    score: TokenProb
    select: Selector
    inputs: InputPolicy = BinaryInputs()
    # the model family's conventions (set once by `plan_decode`): whether [MASK] is never proposed
    # (SUBS) or stays in the softmax as the LLaDA / Dream / SDAR reference loops keep it, and the
    # ids whose proposals rank last (`defer_stop`: EOS / end of turn)
    subs: bool = True
    deferred: tuple[int, ...] = ()
    # ids dropped from the confidence's softmax once the proposal is chosen (LLaDA's
    # `confidence_eos_eot_inf`): proposing them scores 0, the other proposals are renormalised
    unscored: tuple[int, ...] = ()
    sub_block: int = 0  # > 0: only the leftmost sub-block of this width with masks is eligible

    def open(self, state: DecodeState, generators: list[torch.Generator]) -> DecodeState:
        """The state at a block's opening, before its first step (masked decoders: as it is)."""
        return state

    def draws(
        self, state: DecodeState, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What `step` reads after the logits: [B, W] float64 uniforms for the proposals and the
        selector, from each row's generator. Only rows with masks left in the window draw
        (alone, a row whose block is done stops stepping); deterministic decoders draw nothing."""
        lo, hi = state.window
        if not self.random:  # greedy proposals, a deterministic selector: no draw is read
            zeros = torch.zeros(
                state.tokens.shape[0], hi - lo, dtype=torch.float64, device=state.tokens.device
            )
            return zeros, zeros
        u = row_uniform(generators, 2 * (hi - lo), state.tokens.device, rows=state.masked.any(-1).tolist())
        return u[:, : hi - lo], u[:, hi - lo :]

    def step(
        self, state: DecodeState, logits: torch.Tensor, u_token: torch.Tensor, u_select: torch.Tensor
    ) -> DecodeState:
        """logits [B, W, V] for the window; u_* [B, W] float64 per-row uniforms.

        Proposals are made lazily: first where the selector needs them (masked positions the Conv
        gate leaves open), then at chosen positions that have none yet. A selector that ignores
        proposals (ancestral, first-hitting) so proposes only at the positions it commits.
        """
        lo, hi = state.window
        window = state.tokens[:, lo:hi]  # [B, W]
        masked = leftmost_sub_block(state.masked, self.sub_block)  # [B, W] eligible positions
        gate = self.score.gate(state.tokens != state.mask_id)  # [B, T] or None
        gate = torch.ones(window.shape, device=window.device) if gate is None else gate[:, lo:hi]
        confidence = torch.full(window.shape, -torch.inf, dtype=torch.float64, device=window.device)
        kept_mass = torch.ones_like(confidence)
        proposed = window.clone()  # [B, W] proposal per position (the current token elsewhere)
        scored = masked & (gate > 0) if self.select.needs_proposals else torch.zeros_like(masked)
        if scored.any():
            excluded = self._excluded(state)
            proposal = self._propose(logits, scored, u_token, excluded)
            confidence[scored] = (self.score(self._unscored(proposal)) * gate[scored]).double()
            if self.score.random:  # LLaDA's random remasking
                confidence[scored] = u_select[scored] * gate[scored].double()
            if self.deferred:  # e.g. EOS / end of turn: only where nothing else is left
                late_ids = torch.isin(proposal.tokens, torch.tensor(self.deferred, device=window.device))
                confidence[scored] = confidence[scored].masked_fill(late_ids, -torch.inf)
            kept_mass[scored] = proposal.kept_mass
            proposed[scored] = proposal.tokens
        chosen = self.select(
            SelectContext(confidence, gate, kept_mass, masked, state.step, state.steps, u_select)
        )
        late = chosen & ~scored
        if late.any():
            excluded = self._excluded(state)
            proposed[late] = self._propose(logits, late, u_token, excluded).tokens
        tokens = state.tokens.clone()
        tokens[:, lo:hi] = torch.where(chosen, proposed, window)
        return state.advance(tokens=tokens, step=state.step + 1, prev_logits=logits)

    @property
    def random(self) -> bool:
        """Whether a step reads its uniforms: a sampled proposal, a random selector or score."""
        return (
            getattr(self.propose, "random", True)
            or getattr(self.select, "random", True)
            or self.score.random
            or not isinstance(self.inputs, BinaryInputs)
        )

    def _excluded(self, state: DecodeState) -> int | None:
        """The token proposals never take: [MASK], except on models whose reference loops rank by
        the full softmax (LLaDA, Dream, SDAR: `subs = False`) with proposals that keep it there
        (greedy ones, and the families' own `Processed` draws); our own sampled proposals never
        draw [MASK], which would be no decision at all."""
        keeps = getattr(self.propose, "keeps_mask", isinstance(self.propose, Greedy))
        return None if not self.subs and keeps else state.mask_id

    def _unscored(self, proposal: Proposal) -> Proposal:
        """The proposal scored on its distribution without the `unscored` ids (renormalised)."""
        if not self.unscored:
            return proposal
        logits = proposal.dist.logits.clone()
        logits[:, list(self.unscored)] = -torch.inf
        return proposal._replace(
            dist=Distribution.from_logits(logits, None, copy=False, softmax=proposal.dist.softmax)
        )

    def _propose(
        self, logits: torch.Tensor, at: torch.Tensor, u: torch.Tensor, mask_id: int | None
    ) -> Proposal:
        rows = logits[at]  # [N, V]: a fresh tensor (advanced indexing copies), so no second copy
        return self.propose(Distribution.from_logits(rows, mask_id, copy=False), u[at])
