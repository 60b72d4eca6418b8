"""Shared steps: the decoding policies of many lanes at one round, run as one `Decoder.decide`.

A step of the decode loop is the model's forward, then the decoder's propose -> score -> select on
the active window. The forward is shared between lanes (`shared_forward`); this module shares the
second half. A lane sees its plan's decoder through a `LaneDecoder`: at each step it computes its
`Window` (its rows' window tokens, eligible positions, Conv gate, logits, uniforms and each row's
step counter in its block), hands it to the engine (the greenlet switches to its parent with a
`StepCall`) and commits the tokens the engine sends back. The engine stacks the windows of every
lane waiting with the same decision policies (`Decoder.decision`) and the same window width and
vocabulary, whatever their positions, prompt lengths, blocks and steps, and decides them in one
call (`run_steps`).

`decide` works row by row: each row's proposals, confidences and selection read only that row
(its own uniforms from its own generator, its own step counter, per-row counts), with the same
batch-invariant ops the loop uses at any batch size; so a row decided among other lanes' rows
gets the tokens it gets alone (the engine's exactness tests check it). Decoders that do not
decide by `decide` (the uniform-noise `RenoisingDecoder`) step inside their lane as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import greenlet
import torch

from unmask.decoding.decoder import Decoder, Window
from unmask.decoding.state import DecodeState


@dataclass(eq=False)
class StepCall:
    """One lane's step, waiting for its round's shared decision."""

    decoder: Decoder
    window: Window

    @property
    def rows(self) -> int:
        return self.window.tokens.shape[0]

    @property
    def key(self) -> tuple:
        """Steps with equal keys are decided together: the same policies, widths and vocabulary."""
        w = self.window
        return (self.decoder.decision, w.tokens.shape[1], w.logits.shape[-1], w.logits.dtype, w.logits.device)


class LaneDecoder:
    """The plan's decoder as a lane sees it: `step` sends the step's `Window` to the engine (the
    lane's parent greenlet) and commits what comes back; every other attribute is the decoder's."""

    def __init__(self, decoder: Decoder):
        self._decoder = decoder

    def __getattr__(self, name: str):
        return getattr(self._decoder, name)

    def step(self, state: DecodeState, logits: torch.Tensor, *draws) -> DecodeState:
        """`draws`: what the decoder's `draws` gave (uniforms [B, W] x 2; generators for decoders
        with a step of their own)."""
        if type(self._decoder) is not Decoder:  # e.g. the uniform-noise RenoisingDecoder
            return self._decoder.step(state, logits, *draws)
        window = self._decoder.window(state, logits, *draws)
        tokens = greenlet.getcurrent().parent.switch(StepCall(self._decoder, window))  # [B, W]
        return self._decoder.commit(state, tokens, logits)


def step_groups(calls: list[StepCall]) -> list[list[StepCall]]:
    """The step calls of one round grouped by what may be decided together (first come first)."""
    groups: dict[tuple, list[StepCall]] = {}
    for call in calls:
        try:
            key = call.key
            hash(key)
        except TypeError:  # a policy holding something unhashable decides alone
            key = (id(call),)
        groups.setdefault(key, []).append(call)
    return list(groups.values())


def run_steps(calls: list[StepCall]) -> list[torch.Tensor]:
    """One `decide` for `calls` (one group); each call's window tokens [b, W], as alone."""
    if len(calls) == 1:
        return [calls[0].decoder.decide(calls[0].window)]
    tokens = calls[0].decoder.decide(Window.cat([c.window for c in calls]))  # [R, W]
    return list(tokens.split([c.rows for c in calls]))
