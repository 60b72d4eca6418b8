"""`Caller`: the decode loop's one way to run the model (NFE counting, output reuse, CFG)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from unmask.decoding.inputs import BinaryInputs
from unmask.decoding.refresh import View
from unmask.decoding.state import DecodeState
from unmask.models.denoiser import Denoiser
from unmask.models.kv_cache import KVCache

if TYPE_CHECKING:
    from unmask.decoding.plan import DecodePlan


class Caller:
    """Calls the model, counting NFE, and reuses the last output when its input is unchanged.

    `key_mask` [B, T] hides left padding. With `cfg_scale` s > 0 (classifier-free guidance, as in
    LLaDA's reference) each call also runs an unconditional copy whose prompt positions are
    [MASK], in the same batch, and returns `un + (s + 1) (cond - un)` (the hidden states are the
    conditional copy's).
    """

    def __init__(
        self, model: Denoiser, plan: DecodePlan, *, key_mask: torch.Tensor | None = None, prompt_len: int = 0
    ):
        self.model, self.decoder, self.ban_ids = model, plan.decoder, list(plan.ban_ids)
        self.reusable = isinstance(plan.decoder.inputs, BinaryInputs)
        self.last: tuple[torch.Tensor, int, View] | None = None
        self.nfe = 0
        self.key_mask, self.cfg_scale, self.prompt_len = key_mask, plan.cfg.cfg_scale, prompt_len
        # `min_new_tokens`: no stop id at canvas positions before this one (prompts, not templates)
        self.stop_ids = list(plan.stop_ids)
        self.stops_from = prompt_len + plan.cfg.min_new_tokens if prompt_len > 0 and self.stop_ids else 0

    def _forward(
        self, inputs: dict[str, torch.Tensor], cache: KVCache | None, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {} if self.key_mask is None else {"key_mask": self.key_mask}
        if self.cfg_scale <= 0:
            out = self.model(**inputs, cache=cache, **extra)
            return out.logits, out.hidden
        n = max(0, min(self.prompt_len - start, next(iter(inputs.values())).shape[1]))
        both = {}
        for name, x in inputs.items():  # the unconditional copy: prompt positions masked
            un = x.clone()
            if name == "tokens":
                un[:, :n] = self.model.mask_id
            else:
                masks = torch.full(un.shape[:1] + (n,), self.model.mask_id, device=un.device)
                un[:, :n] = self.model.embed(masks)
            both[name] = torch.cat([x, un])
        if self.key_mask is not None:
            extra = {"key_mask": torch.cat([self.key_mask, self.key_mask])}
        out = self.model(**both, cache=cache, **extra)
        cond, un = out.logits.chunk(2)
        return un + (self.cfg_scale + 1) * (cond - un), out.hidden.chunk(2)[0]

    def __call__(
        self, tokens: torch.Tensor, cache: KVCache | None, key: int, start: int, state: DecodeState
    ) -> View:
        """The model's output for `tokens` [B, n] placed at canvas position `start`."""
        last = self.last
        if self.reusable and last is not None and last[1] == key and torch.equal(last[0], tokens):
            return last[2]
        logits, hidden = self._forward(self.decoder.inputs(self.model, tokens, start, state), cache, start)
        self.nfe += 1
        view = self.suppress(View(start, logits, hidden))
        if self.reusable:  # else nothing reads it: do not keep a [B, n, V] output alive between calls
            self.last = (tokens, key, view)
        return view

    def suppress(self, view: View) -> View:
        """-inf on the logits no proposal may take: `ban_stop`'s ids everywhere, the stop ids before
        `min_new_tokens` generated positions (in place; also applied to refreshed views)."""
        if self.ban_ids:
            view.logits[..., self.ban_ids] = -torch.inf
        early = self.stops_from - view.start  # view positions [0, early) are too early to stop
        if early > 0:
            view.logits[:, :early, self.stop_ids] = -torch.inf
        return view

    def forget(self) -> None:
        self.last = None
