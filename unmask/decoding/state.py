"""DecodeState: everything the decode loop knows after a step, as a printable frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property

import torch


@dataclass(frozen=True)
class DecodeState:
    tokens: torch.Tensor  # [B, T] the canvas so far: given tokens, decoded tokens, mask_id elsewhere
    fixed: torch.Tensor  # [B, T] bool: given tokens (prompt / template), never edited
    mask_id: int
    prompt_len: int  # P: positions [0, P) are the left prompt (0 for a pure template)
    window: tuple[int, int]  # [lo, hi): the positions the active block may decode
    block: int  # index of the active block
    step: int  # steps taken in the active block
    steps: int  # step budget of the active block
    nfe: int  # denoiser calls (function evaluations) so far
    commit_passes: int  # clean passes that only append a finished block to the KV cache
    finished: torch.Tensor  # [B] bool: rows that stopped (EOS, entropy collapse, length)
    prev_logits: torch.Tensor | None = None  # [B, W, V] last call's logits for the window (soft inputs)
    refresh_passes: int = 0  # ADJUST sampler passes between commit rounds (not full forwards)
    # uniform-noise decoders (renoising.py): [B, W] the canvas fed at the window's undecided
    # positions (accepted draws and fresh uniform tokens), [B, k, W] the last k argmax canvases
    noisy: torch.Tensor | None = None
    drafts: torch.Tensor | None = None

    def advance(self, **changes) -> DecodeState:
        """A new state with `changes` (what `dataclasses.replace` gives, without re-running the
        generated `__init__`: the loop makes several states per step, in every lane of a server)."""
        unknown = changes.keys() - _FIELDS
        if unknown:
            return replace(self, **changes)  # raises its TypeError naming the field
        new = object.__new__(DecodeState)
        values = {k: v for k, v in self.__dict__.items() if k in _FIELDS}  # not cached properties
        values.update(changes)
        new.__dict__.update(values)
        return new

    @cached_property
    def masked(self) -> torch.Tensor:
        """[B, hi - lo] bool: still-masked positions of the active window in unfinished rows
        (computed once per state: a state is never changed, `advance` makes a new one)."""
        lo, hi = self.window
        return (self.tokens[:, lo:hi] == self.mask_id) & ~self.finished[:, None]


_FIELDS = frozenset(f.name for f in fields(DecodeState))
