"""Uniform-noise decoding (DiffusionGemma's sampler) as policies of the one decode loop.

The model has no [MASK]: a block (its canvas) starts as uniform random tokens, and every step
re-decides every position (`transformers/models/diffusion_gemma/generation_diffusion_gemma.py`):

1. `Annealed`: the window's logits through top-k / top-p (transformers' own warpers, applied
   first as a `logits_processor` list is), then divided by the step's temperature, which falls
   linearly from `temperature` to `temperature_end` (T_k = end + (start - end) (S - k) / S);
2. a categorical draw per position from softmax(processed) with the row's own generator
   (`torch.multinomial`, the reference's own draw), and the argmax canvas;
3. `EntropyBound`: accept the k lowest-entropy positions with sum(H_1..H_k) - max <= bound;
4. the `Renoised` input policy (inputs.py) feeds accepted positions their draw and every other
   position a fresh uniform token (drawn at the end of the step), with the processed logits as the
   next call's self-conditioning input;
5. `AdaptiveStop`: the block stops once its argmax canvas is unchanged for `stable` steps and its
   mean entropy is below `confidence`; at the stop (or the last step) the window becomes the
   argmax canvas.

Acceptances are revised every step, so nothing in the window is final until the block stops: the
loop's state holds the virtual undecided id V there (`DecodeState.masked`), the noisy canvas fed to
the model in `DecodeState.noisy`, the last argmax canvases in `DecodeState.drafts`.

Randomness comes from per-row generators (a row draws only while its block is open), so a row's
tokens do not depend on its batch-mates; a row decoded alone with the generator seeded as the
reference's global generator reproduces `DiffusionGemmaForBlockDiffusion.generate` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unmask.decoding.decoder import Decoder
from unmask.decoding.state import DecodeState


@dataclass(frozen=True)
class Annealed:
    """DiffusionGemma's processed logits: top-k, top-p, then the step's temperature."""

    random = True
    start: float = 0.8
    end: float = 0.4
    linear: bool = True
    top_k: int = 0
    top_p: float = 1.0

    def temperature(self, step: int, steps: int) -> torch.Tensor | float:
        """At step k of S (0-based): end + (start - end) (S - k) / S, computed as the reference does
        (the remaining-step count an int32 tensor, so the temperature is a float32 scalar)."""
        if not self.linear:
            return self.start
        remaining = torch.tensor(steps - step, dtype=torch.int32)
        return self.end + (self.start - self.end) * (remaining / steps)

    def __call__(self, logits: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        """logits [B, W, V] -> processed float32 logits [B, W, V]."""
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        x = logits.float()
        if self.top_k:
            x = TopKLogitsWarper(self.top_k)(None, x)
        if self.top_p < 1:  # per position: the warper works on [N, V]
            x = TopPLogitsWarper(self.top_p)(None, x.reshape(-1, x.shape[-1])).view(x.shape)
        return x / self.temperature(step, steps)


@dataclass(frozen=True)
class EntropyBound:
    """The k lowest-entropy positions with sum(H_1..H_k) - max(H_1..H_k) <= bound (an upper bound
    on their joint mutual information: nearly independent draws), at least the lowest one."""

    bound: float = 0.1
    needs_proposals = True
    until_done = False
    random = False

    def accept(self, entropy: torch.Tensor) -> torch.Tensor:
        """entropy [B, W] -> accepted [B, W] bool."""
        ranked, order = torch.sort(entropy, dim=-1, descending=False)
        within = torch.cumsum(ranked, dim=-1) - ranked <= self.bound  # ranked[k] is the max so far
        return torch.scatter(torch.zeros_like(within), -1, order, within)


@dataclass(frozen=True)
class AdaptiveStop:
    """Stop a block once its argmax canvas equals the last `stable` ones and the mean entropy of
    its processed distributions is below `confidence` (0: never stop early)."""

    confidence: float = 0.0
    stable: int = 1

    def opening(self, B: int, W: int, device) -> torch.Tensor | None:
        if self.confidence <= 0 or self.stable == 0:
            return None
        return torch.full((B, self.stable, W), -1, dtype=torch.long, device=device)  # [B, k, W]

    def __call__(
        self, drafts: torch.Tensor | None, argmax: torch.Tensor, entropy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (stopped [B] bool, the updated drafts)."""
        if self.confidence <= 0:
            return torch.zeros(argmax.shape[0], dtype=torch.bool, device=argmax.device), drafts
        stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        if drafts is not None:
            stable = (drafts == argmax[:, None]).all(-1).all(-1)
            drafts = torch.cat([drafts[:, 1:], argmax[:, None]], dim=1)
        return stable & (entropy.mean(-1) < self.confidence), drafts


@dataclass(frozen=True)
class RenoisingDecoder(Decoder):
    """`Decoder` for uniform-noise models: `propose` is `Annealed`, `select` is `EntropyBound`,
    `inputs` is `Renoised`; `stop` ends a block early. `vocab` (the model's V: what re-noising
    draws from) and `keep_dtype` (the self-conditioning logits kept between steps, in the model's
    embedding dtype as the reference keeps them) are set by `plan_decode`."""

    stop: AdaptiveStop = field(default_factory=AdaptiveStop)
    vocab: int = 0
    keep_dtype: torch.dtype = torch.float32

    @property
    def random(self) -> bool:
        return True

    def draws(self, state: DecodeState, generators: list[torch.Generator]) -> tuple:
        return (generators,)

    def _noise(self, g: torch.Generator, W: int, device) -> torch.Tensor:
        return torch.randint(0, self.vocab, (1, W), generator=g)[0].to(device)  # the reference's [B=1, L]

    def open(self, state: DecodeState, generators: list[torch.Generator]) -> DecodeState:
        """A block's opening canvas: uniform tokens for the rows whose block is undecided."""
        lo, hi = state.window
        W = hi - lo
        noisy = state.tokens[:, lo:hi].clone()
        for b in state.masked.any(-1).nonzero().flatten().tolist():
            noisy[b] = self._noise(generators[b], W, noisy.device)
        drafts = self.stop.opening(noisy.shape[0], W, noisy.device)
        return state.advance(noisy=noisy, drafts=drafts)

    def step(
        self, state: DecodeState, logits: torch.Tensor, generators: list[torch.Generator]
    ) -> DecodeState:
        """logits [B, W, V] for the window (the decoder pass over the noisy canvas)."""
        lo, hi = state.window
        W = hi - lo
        rows = state.masked.any(-1).nonzero().flatten().tolist()  # blocks still being denoised
        processed = self.propose(logits, state.step, state.steps)  # [B, W, V] float32
        argmax = processed.argmax(-1)  # [B, W]
        entropy = torch.distributions.Categorical(logits=processed).entropy()  # [B, W]
        accepted = self.select.accept(entropy)
        noisy = state.noisy.clone()
        for b in rows:  # the reference's order per row: the canvas draw, then the re-noising draw
            probs = torch.softmax(processed[b], dim=-1, dtype=torch.float32)  # [W, V]
            drawn = _multinomial(probs, generators[b])  # [W]
            noisy[b] = torch.where(accepted[b], drawn, self._noise(generators[b], W, noisy.device))
        stopped, drafts = self.stop(state.drafts, argmax, entropy)
        done = stopped | (state.step + 1 >= state.steps)
        settle = torch.zeros_like(done)
        settle[rows] = done[rows]
        tokens = state.tokens.clone()
        tokens[:, lo:hi] = torch.where(settle[:, None], argmax, state.tokens[:, lo:hi])
        return state.advance(
            tokens=tokens,
            step=state.step + 1,
            prev_logits=processed.to(self.keep_dtype),  # the next step's self-conditioning input
            noisy=noisy,
            drafts=drafts,
        )


def _multinomial(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One draw per row of probs [W, V] from `g` (torch.multinomial, as the reference draws; on an
    accelerator the draw runs on the generator's device, the CPU)."""
    if probs.device != g.device:
        return torch.multinomial(probs.cpu(), 1, generator=g)[:, 0].to(probs.device)
    return torch.multinomial(probs, 1, generator=g)[:, 0]
