"""Decoder = propose -> score -> select, plus what still-masked positions feed the model.

`step()` turns the model's logits for the active window into the next state. It knows nothing
about blocks, caches or model kinds: that is `generate()`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol

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


class Window(NamedTuple):
    """One step's input, row by row: the active window of R rows (one state's, or several lanes'
    stacked, `Window.cat`), what the model said there, and each row's place in its block."""

    tokens: torch.Tensor  # [R, W] the window's tokens now
    masked: torch.Tensor  # [R, W] bool: eligible positions (masked, in an unfinished row)
    gate: torch.Tensor  # [R, W] Conv gate (ones without Conv)
    logits: torch.Tensor  # [R, W, V]
    step: torch.Tensor  # [R] long: steps the row's block has taken
    steps: torch.Tensor  # [R] long: the row's block budget
    u_token: torch.Tensor  # [R, W] float64 uniforms of the proposals
    u_select: torch.Tensor  # [R, W] float64 uniforms of the selector
    mask_id: int

    @classmethod
    def cat(cls, windows: list[Window]) -> Window:
        """Windows of equal width (and vocabulary), stacked along their rows."""
        first = windows[0]
        return cls(*(torch.cat([w[i] for w in windows]) for i in range(len(first) - 1)), first.mask_id)


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
        """logits [B, W, V] for the window; u_* [B, W] float64 per-row uniforms -> the next state."""
        return self.commit(state, self.decide(self.window(state, logits, u_token, u_select)), logits)

    def window(
        self, state: DecodeState, logits: torch.Tensor, u_token: torch.Tensor, u_select: torch.Tensor
    ) -> Window:
        """What a step decides from, row by row (the serving engine stacks several lanes' windows
        and decides them in one `decide`)."""
        lo, hi = state.window
        tokens = state.tokens[:, lo:hi]  # [B, W]
        gate = self.score.gate(state.tokens != state.mask_id, (lo, hi))  # [B, W] or None
        B, device = tokens.shape[0], tokens.device
        return Window(
            tokens=tokens,
            masked=leftmost_sub_block(state.masked, self.sub_block),
            gate=torch.ones(tokens.shape, device=device) if gate is None else gate,
            logits=logits,
            step=torch.full((B,), state.step, dtype=torch.long, device=device),
            steps=torch.full((B,), state.steps, dtype=torch.long, device=device),
            u_token=u_token,
            u_select=u_select,
            mask_id=state.mask_id,
        )

    def decide(self, w: Window) -> torch.Tensor:
        """The window's tokens after the step [R, W]: the chosen positions' proposals, the rest as
        they were. Each row's result depends on that row alone.

        Proposals are made lazily: first where the selector needs them (masked positions the Conv
        gate leaves open), then at chosen positions that have none yet. A selector that ignores
        proposals (ancestral, first-hitting) so proposes only at the positions it commits.
        """
        masked, gate, u_select = w.masked, w.gate, w.u_select
        confidence = torch.full(w.tokens.shape, -torch.inf, dtype=torch.float64, device=w.tokens.device)
        kept_mass = torch.ones_like(confidence)
        proposed = w.tokens.clone()  # [R, W] proposal per position (the current token elsewhere)
        scored = masked & (gate > 0) if self.select.needs_proposals else torch.zeros_like(masked)
        if scored.any():
            proposal = self._propose(w.logits, scored, w.u_token, self._excluded(w.mask_id))
            confidence[scored] = (self.score(self._unscored(proposal)) * gate[scored]).double()
            if self.score.random:  # LLaDA's random remasking
                confidence[scored] = u_select[scored] * gate[scored].double()
            if self.deferred:  # e.g. EOS / end of turn: only where nothing else is left
                late_ids = torch.isin(proposal.tokens, torch.tensor(self.deferred, device=w.tokens.device))
                confidence[scored] = confidence[scored].masked_fill(late_ids, -torch.inf)
            kept_mass[scored] = proposal.kept_mass
            proposed[scored] = proposal.tokens
        chosen = self.select(SelectContext(confidence, gate, kept_mass, masked, w.step, w.steps, u_select))
        late = chosen & ~scored
        if late.any():
            proposed[late] = self._propose(w.logits, late, w.u_token, self._excluded(w.mask_id)).tokens
        return torch.where(chosen, proposed, w.tokens)

    def commit(self, state: DecodeState, window: torch.Tensor, logits: torch.Tensor) -> DecodeState:
        """The state with the active window's tokens `window` [B, W], one step on."""
        lo, hi = state.window
        tokens = state.tokens.clone()
        tokens[:, lo:hi] = window
        return state.advance(tokens=tokens, step=state.step + 1, prev_logits=logits)

    @cached_property
    def decision(self) -> tuple:
        """What `decide` reads of this decoder: decoders with equal `decision`s decide stacked
        windows together (the input policy and the sub-block width act before, in `window`)."""
        return (self.propose, self.score, self.select, self.subs, self.deferred, self.unscored)

    @property
    def random(self) -> bool:
        """Whether a step reads its uniforms: a sampled proposal, a random selector or score."""
        return (
            getattr(self.propose, "random", True)
            or getattr(self.select, "random", True)
            or self.score.random
            or not isinstance(self.inputs, BinaryInputs)
        )

    def _excluded(self, mask_id: int) -> int | None:
        """The token proposals never take: [MASK], except on models whose reference loops rank by
        the full softmax (LLaDA, Dream, SDAR: `subs = False`) with proposals that keep it there
        (greedy ones, and the families' own `Processed` draws); our own sampled proposals never
        draw [MASK], which would be no decision at all."""
        keeps = getattr(self.propose, "keeps_mask", isinstance(self.propose, Greedy))
        return None if not self.subs and keeps else mask_id

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
