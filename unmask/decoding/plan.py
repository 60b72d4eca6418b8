"""`DecodePlan`: one decode request, resolved and checked once, for every driver.

`plan_decode(model, cfg, ...)` builds it next to `build_decoder`: from the `DecodeConfig`, the
tokenizer (its end-of-text and stop ids, its chat template), the noise schedule and the model's
limits. It owns every check that crosses fields (the settings against the model kind, the cache,
the sampler, the prompt length against the canvas), so `generate()`, the command line, the server
and the lm-eval model raise the same `DecodeError` for the same mistake.

`generate(model, plan, prompt=...)` and its three loops read every loop setting from `plan.cfg`
(the `DecodeConfig` itself: a new loop knob is a config field and the loop that reads it).
Family conventions are read here once: whether [MASK] stays in the proposal softmax (`subs`) and
the stop ids that `ban_stop` / `defer_stop` act on live in the plan's decoder, not in every step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from unmask.config import DecodeConfig
from unmask.decoding.decoder import Decoder
from unmask.decoding.inputs import BinaryInputs
from unmask.decoding.presets import build_decoder
from unmask.decoding.proposals import Greedy
from unmask.decoding.refresh import Refresher, SamplerRefresh, build_refresher
from unmask.decoding.renoising import RenoisingDecoder
from unmask.models.denoiser import Denoiser
from unmask.schedules import LogLinear, NoiseSchedule

# cache setting -> what a model kind does with it. For block-causal and causal models the prefix
# cache *is* exact; bidirectional models get the approximate Fast-dLLM caches.
CACHES = {
    "block_causal": {"auto": "exact", "prefix": "exact", "none": "none"},
    "causal": {"auto": "exact", "prefix": "exact", "none": "none"},
    "bidirectional": {"auto": "none", "none": "none", "prefix": "prefix", "dual": "dual"},
}
MASK_SLOT = re.compile(r"<mask(?:\*(\d+))?>")  # infill slots: <mask> or <mask*N>


class DecodeError(ValueError):
    """Bad decoding input; the message names the argument."""


@dataclass(frozen=True)
class DecodePlan:
    cfg: DecodeConfig  # every loop setting (steps, block_len, rounds, eos_fill, ...), read by the loops
    decoder: Decoder  # propose -> score -> select, with the family's [MASK] and stop conventions
    refresher: Refresher  # what updates the distributions between two commit rounds
    kind: str  # the model's attention: block_causal | bidirectional | causal
    cache: str  # resolved: exact | none | prefix | dual
    mask_id: int
    eos_id: int | None  # finished rows and the EOS-fill are written with it
    stop_ids: tuple[int, ...]  # a row stops at the first of these; completions end before it
    max_len: int | None = None  # the longest canvas the model allows (None: no limit)
    precision: str = "fp32"
    tokenizer: Any = None  # encodes prompts / chats / infill templates and decodes records
    blocks_from_prompt: bool = False  # the first block starts at the prompt's end, not on the L' grid

    @property
    def ban_ids(self) -> tuple[int, ...]:
        """Ids whose logits are -inf: every stop id with `ban_stop` (answers use the whole budget),
        EOS alone with LLaDA's `logits_eos_inf`."""
        if self.cfg.ban_stop:
            return self.stop_ids
        return (self.eos_id,) if self.cfg.logits_eos_inf and self.eos_id is not None else ()

    # ------------------------------------------------------------------------------ input

    def check_length(self, n: int, *, template: bool = False) -> None:
        """A prompt (or infill template) of `n` tokens fits the model's canvas."""
        new = 0 if template else self.cfg.max_new_tokens
        if self.max_len is None:
            return
        if n >= self.max_len or (self.kind == "bidirectional" and n + new > self.max_len):
            raise DecodeError(
                f"{'template' if template else 'prompt'} of {n} tokens + {new} new tokens exceeds the "
                f"model's maximum of {self.max_len}"
            )

    def check_input(
        self,
        given: torch.Tensor,
        *,
        template: bool,
        generators: list[torch.Generator],
        prompt_mask: torch.Tensor | None = None,
    ) -> None:
        """What `generate()` is given: `given` [B, n] (a prompt, or a template with masks anywhere)."""
        name = "template" if template else "prompt"
        if given.dim() != 2 or given.shape[1] == 0:
            raise DecodeError(
                f"{name} must be [B, n] with n >= 1 (use [BOS] for unconditional generation), "
                f"got shape {tuple(given.shape)}"
            )
        if len(generators) != given.shape[0]:
            raise DecodeError(f"need one generator per row: {len(generators)} for {given.shape[0]} rows")
        if template:
            if self.kind != "bidirectional":
                raise DecodeError(f"infilling templates need a bidirectional model, not {self.kind}")
            if not (given == self.mask_id).any(-1).all():
                raise DecodeError("every template row needs at least one [MASK] to fill")
            if self.cfg.cfg_scale > 0:
                raise DecodeError("classifier-free guidance (cfg_scale > 0) needs a prompt, not a template")
        self.check_length(given.shape[1], template=template)
        if prompt_mask is not None:
            if self.kind != "bidirectional" or template:
                raise DecodeError(
                    "left-padded prompts (prompt_mask) need a bidirectional model and prompt=; "
                    "block-causal rows are batched by prompt length instead"
                )
            if prompt_mask.shape != given.shape or not prompt_mask.any(-1).all():
                raise DecodeError(
                    f"prompt_mask must be a bool [B, P] = {tuple(given.shape)} with a real token "
                    f"in every row, got {tuple(prompt_mask.shape)}"
                )

    # -------------------------------------------------------------------------- tokenizer

    def _tok(self):
        if self.tokenizer is None:
            raise DecodeError("this plan has no tokenizer: build it with plan_decode(..., tokenizer=)")
        return self.tokenizer

    def prompt_ids(self, text: str, *, chat: bool = False) -> list[int]:
        """A prompt as the model is fed: the tokenizer's BOS convention, or one user turn of its
        chat template with `chat` (the same function serve, lm-eval and `sample --chat` use)."""
        return self._tok().prompt_ids(text, chat=chat)

    def infill_ids(self, text: str) -> list[int]:
        """An infill template: `text` with `<mask>` (one [MASK]) or `<mask*N>` (N of them) slots,
        e.g. "def f(x):<mask*16>return y"; the text between slots is encoded piece by piece."""
        tok = self._tok()
        pieces = MASK_SLOT.split(text)  # [text, N, text, N, text, ...]
        if len(pieces) == 1:
            raise DecodeError(
                "an infill template needs at least one <mask> or <mask*N> slot, e.g. "
                "'def f(x):<mask*16>return y'"
            )
        ids = tok.prompt_ids(pieces[0])
        for n, piece in zip(pieces[1::2], pieces[2::2], strict=True):
            count = int(n) if n is not None else 1
            if count < 1:
                raise DecodeError(f"<mask*{n}>: a slot holds at least one [MASK]")
            ids += [self.mask_id] * count + tok.encode(piece)
        return ids

    def suffix_ids(self, prompt: str, suffix: str) -> list[int]:
        """Fill-in-the-middle: prompt + `cfg.max_new_tokens` [MASK]s + suffix, as one template."""
        tok = self._tok()
        return tok.prompt_ids(prompt) + [self.mask_id] * self.cfg.max_new_tokens + tok.encode(suffix)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation through the model's chat template, the assistant's turn opened."""
        tok = self._tok()
        return tok.encode_chat(tok.chat(messages))


def _unscored_ids(cfg: DecodeConfig, decoder: Decoder, eos_id, stop_ids) -> tuple[int, ...]:
    """LLaDA's `confidence_eos_eot_inf` as its loop runs: `logits_with_noise[EOS] = logits[EoT] =
    -inf` after x0 is drawn, and the confidence is softmax(logits)[x0]. Without temperature the
    noised logits are the logits themselves, so greedy proposals lose both; sampled ones only EoT."""
    if not cfg.confidence_eos_eot_inf:
        return ()
    eot = tuple(i for i in stop_ids if i != eos_id)
    greedy = getattr(decoder.propose, "greedy", isinstance(decoder.propose, Greedy))
    return eot + ((eos_id,) if greedy and eos_id is not None else ())


def plan_decode(
    model: Denoiser,
    cfg: DecodeConfig,
    *,
    schedule: NoiseSchedule | None = None,
    tokenizer=None,
    eos_id: int | None = None,
    max_len: int | None = None,
    precision: str = "fp32",
    sampler=None,
    decoder: Decoder | None = None,
    refresher: Refresher | None = None,
) -> DecodePlan:
    """The plan for decoding with `cfg` on `model`. End-of-text and stop ids come from `tokenizer`
    (its `eos_id`, `stop_ids`), else from `eos_id` alone. `sampler`: a trained ADJUST sampler
    (`cfg.refresh == "sampler"`). `decoder` / `refresher` replace the ones `cfg` names (custom
    policies; tests)."""
    kind = model.cfg.attention
    if tokenizer is not None:
        eos_id, stop_ids = tokenizer.eos_id, tuple(tokenizer.stop_ids)
    else:
        stop_ids = (eos_id,) if eos_id is not None else ()
    if cfg.cache not in CACHES[kind]:
        raise DecodeError(
            f"cache={cfg.cache!r} does not apply to a {kind} model; use one of {', '.join(CACHES[kind])}"
        )
    cache = CACHES[kind][cfg.cache]
    if refresher is None:
        try:
            refresher = build_refresher(cfg.refresh, sampler)
        except ValueError as e:
            raise DecodeError(str(e)) from None
    decoder = decoder if decoder is not None else build_decoder(cfg, schedule or LogLinear())
    # the family's conventions, read once: [MASK] in the softmax or not, the ids deferred to last
    decoder = replace(
        decoder,
        subs=model.subs,
        deferred=stop_ids if cfg.defer_stop else (),
        unscored=_unscored_ids(cfg, decoder, eos_id, stop_ids),
    )
    uniform = model.noising == "uniform"
    if uniform or isinstance(decoder, RenoisingDecoder) or cfg.inputs == "renoise":
        _check_uniform(model, cfg, decoder, kind, cache, uniform)
        decoder = replace(decoder, vocab=model.vocab_size, keep_dtype=model.tok_embed.weight.dtype)
    elif not isinstance(decoder.inputs, BinaryInputs) and model.soft_mask is None:
        raise DecodeError(
            "soft inputs (--decode.inputs soft) need a model trained with soft-masking "
            "(--soft-mask.k); this checkpoint has no soft-mask module"
        )
    if cfg.cfg_scale < 0:
        raise DecodeError(f"cfg_scale must be >= 0, got {cfg.cfg_scale}")
    if cfg.cfg_scale > 0 and (cache != "none" or kind == "causal"):
        raise DecodeError(
            "classifier-free guidance (cfg_scale > 0) needs a diffusion model, a prompt and "
            "--decode.cache none (the unconditional copy has no cache of its own)"
        )
    if cfg.ar_first_token and (kind != "block_causal" or cache != "exact"):
        raise DecodeError(
            "ar_first_token (Fast-dLLM v2's block-opening token) reads the last logit of the previous "
            f"block's commit pass: it needs a block-causal model and its block KV cache, not a {kind} "
            f"model with cache={cfg.cache!r}"
        )
    if cfg.rounds > 1 and kind == "causal":
        raise DecodeError(
            "commit rounds per forward (rounds > 1, ADJUST) need a diffusion model; a causal "
            "model decodes one token per call"
        )
    if isinstance(refresher, SamplerRefresh) and cfg.cfg_scale > 0:
        raise DecodeError(
            "the ADJUST sampler refreshes the conditional hidden states only; it does not "
            "combine with classifier-free guidance (cfg_scale > 0)"
        )
    return DecodePlan(
        cfg=cfg,
        decoder=decoder,
        refresher=refresher,
        kind=kind,
        cache=cache,
        mask_id=model.mask_id,
        eos_id=eos_id,
        stop_ids=stop_ids,
        max_len=max_len,
        precision=precision,
        tokenizer=tokenizer,
        blocks_from_prompt=uniform,
    )


# what a uniform-noise model's decoding (renoising.py) cannot take, and why
NOT_UNIFORM = {
    "kernel": "the Conv gate weighs confidences by decoded neighbours, and a canvas has none until it stops",
    "rounds": "commit rounds / ADJUST refresh distributions of [MASK] positions",
    "cfg_scale": "classifier-free guidance masks the prompt, and the model has no [MASK]",
    "ar_first_token": "the block-opening token is Fast-dLLM v2's",
    "sub_block": "sub-blocks decode [MASK] positions left to right",
    "defer_stop": "it ranks [MASK] proposals",
    "confidence_eos_eot_inf": "it renormalises a [MASK] proposal's confidence",
}


def _check_uniform(model: Denoiser, cfg: DecodeConfig, decoder: Decoder, kind, cache, uniform: bool) -> None:
    """A uniform-noise model takes the re-noising decoder and nothing mask-based; the re-noising
    decoder needs such a model and its encoder's KV cache."""
    if not uniform:
        raise DecodeError(
            "the re-noising decoder (--decode.select entropy-bound, --decode.inputs renoise) needs a "
            "uniform-noise model such as DiffusionGemma; this model decodes [MASK] positions"
        )
    if not isinstance(decoder, RenoisingDecoder) or cfg.inputs != "renoise":
        raise DecodeError(
            "a uniform-noise model (DiffusionGemma) has no [MASK]: decode it with --preset diffusion-gemma "
            "(--decode.select entropy-bound --decode.inputs renoise), not a mask-based decoder"
        )
    if kind != "block_causal" or cache != "exact":
        raise DecodeError(
            "DiffusionGemma decodes each canvas against its encoder's KV cache: use --decode.cache auto"
        )
    default = DecodeConfig()
    for name, why in NOT_UNIFORM.items():
        if getattr(cfg, name) != getattr(default, name):
            raise DecodeError(f"--decode.{name} does not apply to a uniform-noise model: {why}")
    if cfg.refresh != "none":
        raise DecodeError("--decode.refresh does not apply to a uniform-noise model (no commit rounds)")
