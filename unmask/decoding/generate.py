"""THE decode loop: blocks x steps (x commit rounds), yielding a `DecodeState` after every step.

One loop serves every model kind and every decoder:

- block-causal (BD3-LM, Arriola et al. 2025): blocks of L' generated left to right, each denoised
  for its share of the step budget against the *exact* KV cache of the clean prefix; a finished
  block is run once clean to append its K/V (a commit pass, counted apart from NFE). Generation
  continues past the training length until [EOS], an entropy collapse, or `max_new_tokens`.
  A prompt that ends inside a block makes that block's prompt tokens fixed inputs of the first
  active block (exactly what the model saw in training).
- bidirectional (MDLM, LLaDA-style): a canvas of prompt + `max_new_tokens` masks (or any template
  with masks anywhere, for infilling), decoded whole or in semi-AR blocks of `block_len`; optional
  Fast-dLLM prefix/dual caches, refreshed at every block boundary by a full pass (approximate:
  cached K/V go stale as later tokens change). EOS-fill after each step.
- causal (AR): one token per call with the exact KV cache; only the decoder's proposal is used.

With `rounds` R > 1 each full forward is followed by R commit rounds (decoder steps), a
`refresher` updating the distributions in between (ADJUST's sampler, none for the marginal
baseline, the model itself for the exact check); `steps` counts rounds, so a block of S steps
costs ceil(S / R) forwards. Rounds compose with every score, gate, selector, input policy and
cache above.

If a step changes no token, the next step reuses the previous output (no new call, MDLM caching).
Randomness comes from per-row generators, so a row's output does not depend on its batch-mates.
The loop runs under `torch.inference_mode()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from unmask.decoding.caller import Caller
from unmask.decoding.decoder import Decoder
from unmask.decoding.plan import CACHES, DecodeError, DecodePlan, plan_decode
from unmask.decoding.proposals import Distribution
from unmask.decoding.refresh import View
from unmask.decoding.rng import row_uniform
from unmask.decoding.state import DecodeState
from unmask.models import invariant
from unmask.models.denoiser import Denoiser
from unmask.models.transformer import autocast

ENTROPY_WINDOW = 256
__all__ = ["CACHES", "DecodeError", "DecodePlan", "completions", "final_state", "generate", "plan_decode"]


def _until_done(decoder: Decoder) -> bool:
    """The selector commits >= 1 position per step and decodes each block until it is done
    (Fast-dLLM's threshold): at most a block's width of steps, whatever the budget."""
    return decoder.select.until_done


def _unigram_entropy(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, n] -> [B] entropy (nats) of each row's empirical token distribution."""
    counts = torch.zeros(tokens.shape[0], vocab, device=tokens.device).scatter_add_(
        1, tokens, torch.ones_like(tokens, dtype=torch.float32)
    )
    p = counts / tokens.shape[1]
    return -invariant.row_sum(p * p.clamp_min(1e-12).log())


def _eos_fill(state: DecodeState, eos_id: int) -> DecodeState:
    """Every non-fixed position right of a row's first generated [EOS] becomes [EOS]."""
    tokens = state.tokens
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    is_eos = (tokens == eos_id) & ~state.fixed
    first = torch.where(is_eos, pos, tokens.shape[1]).min(-1, keepdim=True).values  # [B, 1]
    fill = (pos > first) & ~state.fixed
    if not fill.any():
        return state
    return state.advance(tokens=torch.where(fill, eos_id, tokens))


def generate(
    model: Denoiser,
    plan: DecodePlan,
    *,
    prompt: torch.Tensor | None = None,
    template: torch.Tensor | None = None,
    generators: list[torch.Generator],
    prompt_mask: torch.Tensor | None = None,
) -> Iterator[DecodeState]:
    """Decode `prompt` [B, P] (left context) or `template` [B, T] (masks anywhere, bidirectional
    models only) as `plan` says (`plan_decode`). `plan.cfg.steps` is the budget for
    `max_new_tokens` tokens; each block gets its share. `prompt_mask` [B, P] (True = real token)
    marks left padding in a batch of unequal prompts (bidirectional models). One generator per row."""
    if (prompt is None) == (template is None):
        raise DecodeError("pass exactly one of prompt= or template=")
    given = prompt if prompt is not None else template
    plan.check_input(given, template=template is not None, generators=generators, prompt_mask=prompt_mask)
    loop = {"block_causal": _block_loop, "bidirectional": _canvas_loop, "causal": _ar_loop}[plan.kind]
    with torch.inference_mode(), autocast(plan.precision, given.device):
        yield from loop(model, plan, given, prompt is not None, generators, prompt_mask)


def _opening(tokens, fixed, mask_id: int, P: int, at: int, steps: int) -> DecodeState:
    """The state before the first block: tokens [B, T], nothing decoded, no row finished."""
    return DecodeState(
        tokens=tokens,
        fixed=fixed,
        mask_id=mask_id,
        prompt_len=P,
        window=(at, at),
        block=-1,
        step=0,
        steps=steps,
        nfe=0,
        commit_passes=0,
        finished=torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device),
    )


def _rounds(
    model: Denoiser, plan: DecodePlan, state: DecodeState, forward, call: Caller, generators, after=None
) -> Iterator[DecodeState]:
    """One full forward, then up to `plan.cfg.rounds` commit rounds (decoder steps), the view
    refreshed between two rounds; yields each round's state and returns the last.
    `forward(state)` -> View."""
    lo, hi = state.window
    rounds, refresher = plan.cfg.rounds, plan.refresher
    view = forward(state)
    for r in range(rounds):
        logits = view.logits[:, lo - view.start : hi - view.start]  # [B, W, V] the window's
        state = plan.decoder.step(state.advance(nfe=call.nfe), logits, *plan.decoder.draws(state, generators))
        if after is not None:
            state = after(state)
        yield state
        if r + 1 == rounds or state.step >= state.steps or not state.masked.any():
            break
        n = view.logits.shape[1]
        view = refresher(
            model, state.tokens[:, view.start : view.start + n], view, lambda state=state: forward(state)
        )
        if refresher.cost == "pass":
            view = call.suppress(view)
            state = state.advance(refresh_passes=state.refresh_passes + 1)
    return state


def _block_loop(model: Denoiser, plan: DecodePlan, prompt, _, generators, prompt_mask):
    cfg, eos_id = plan.cfg, plan.eos_id
    B, P = prompt.shape
    Lb = model.cfg.block_size
    device = prompt.device
    cap = P + cfg.max_new_tokens
    # the first active block holds the prompt's tail, if any; a model without a block grid
    # (DiffusionGemma: a causal encoder, canvases placed anywhere) starts its first canvas at P
    start = P if plan.blocks_from_prompt else (P // Lb) * Lb
    n_blocks = math.ceil((cap - start) / Lb)
    block_steps = cfg.block_steps or max(1, round(cfg.steps * Lb / cfg.max_new_tokens))
    if _until_done(plan.decoder):
        block_steps = Lb
    kv = model.new_cache(B, start + n_blocks * Lb, device) if plan.cache == "exact" else None
    call = Caller(model, plan, prompt_len=P)
    commits = 0
    upcoming = None  # [B, V] what the last committed position predicts next (ar_first_token)
    if kv is not None and start > 0:
        upcoming = model(prompt[:, :start], cache=kv).next_logits
        kv.commit(start)
        commits += 1
    state = _opening(prompt, torch.ones_like(prompt, dtype=torch.bool), model.mask_id, P, start, block_steps)
    state = state.advance(commit_passes=commits)
    for block in range(n_blocks):
        lo, hi = start + block * Lb, start + (block + 1) * Lb
        new = hi - state.tokens.shape[1]
        fill = torch.where(state.finished, eos_id if eos_id is not None else model.mask_id, model.mask_id)
        tokens = torch.cat([state.tokens, fill[:, None].expand(B, new)], dim=1)
        fixed = torch.cat([state.fixed, state.finished[:, None].expand(B, new)], dim=1)
        state = state.advance(
            tokens=tokens, fixed=fixed, window=(lo, hi), block=block, step=0, prev_logits=None
        )
        if cfg.ar_first_token and lo >= P:
            state = _open_block(state, upcoming, call, lo)
        state = plan.decoder.open(state, generators)

        def forward(state, block=block, lo=lo, hi=hi) -> View:  # the active block's output
            if kv is not None:
                return call(state.tokens[:, lo:hi], kv, block, lo, state)
            view = call(state.tokens[:, :hi], None, block, 0, state)
            return View(lo, view.logits[:, lo:hi], view.hidden[:, lo:hi])

        while state.step < block_steps and state.masked.any():
            state = yield from _rounds(model, plan, state, forward, call, generators)
        state = _finish_rows(state, plan, P, cap, model.vocab_size)
        if state.finished.all():
            break
        if kv is not None:  # append the finished block's clean K/V (not after the last block)
            upcoming = model(state.tokens[:, lo:hi], cache=kv).next_logits
            kv.commit(Lb)
            state = state.advance(commit_passes=state.commit_passes + 1)
    yield state.advance(tokens=state.tokens[:, :cap], fixed=state.fixed[:, :cap])


def _open_block(state: DecodeState, upcoming: torch.Tensor | None, call: Caller, lo: int) -> DecodeState:
    """Fast-dLLM v2's block opening: position `lo` becomes the argmax of `upcoming` [B, V], the
    logits the previous block's last output (or the prompt's) gives it, before any step."""
    if upcoming is None:
        raise DecodeError(
            "--decode.ar_first_token needs a model whose last output predicts the next position (a "
            "shifted block-causal family such as Fast-dLLM v2); this model gives no such logits"
        )
    logits = call.suppress(View(lo, upcoming[:, None].clone(), upcoming[:, None])).logits[:, 0]  # [B, V]
    tokens = state.tokens.clone()
    tokens[:, lo] = torch.where(state.fixed[:, lo], tokens[:, lo], logits.argmax(-1))
    return state.advance(tokens=tokens)


def _finish_rows(state: DecodeState, plan: DecodePlan, P: int, cap: int, vocab: int) -> DecodeState:
    """After a block: rows with a generated stop token ([EOS], end of turn), a collapsed entropy
    or the length cap stop."""
    tokens = state.tokens
    finished = state.finished.clone()
    if plan.stop_ids:
        generated = tokens[:, P:]
        finished |= torch.isin(generated, torch.tensor(plan.stop_ids, device=tokens.device)).any(-1)
    if plan.eos_id is not None:
        state = _eos_fill(state, plan.eos_id)
    if plan.cfg.stop_entropy > 0 and tokens.shape[1] - P >= ENTROPY_WINDOW:
        finished |= _unigram_entropy(tokens[:, -ENTROPY_WINDOW:], vocab) < plan.cfg.stop_entropy
    if tokens.shape[1] >= cap:
        finished[:] = True
    return state.advance(finished=finished)


def _canvas_loop(model: Denoiser, plan: DecodePlan, given, is_prompt, generators, prompt_mask):
    cfg, cache, mask_id = plan.cfg, plan.cache, model.mask_id
    B = given.shape[0]
    device = given.device
    if is_prompt:
        P, new = given.shape[1], cfg.max_new_tokens
        tokens = torch.cat([given, torch.full((B, new), mask_id, device=device)], dim=1)
        fixed = torch.cat(
            [torch.ones_like(given, dtype=torch.bool), torch.zeros(B, new, dtype=torch.bool, device=device)],
            dim=1,
        )
    else:
        P, tokens, fixed = 0, given, given != mask_id
    T = tokens.shape[1]
    region = T - P
    block_len = min(cfg.block_len or region, region)  # a block wider than the canvas is the canvas
    n_blocks = math.ceil(region / block_len)
    block_steps = block_len if _until_done(plan.decoder) else max(1, round(cfg.steps * block_len / region))
    key_mask = None
    if prompt_mask is not None:
        generated = torch.ones(B, T - P, dtype=torch.bool, device=device)
        key_mask = torch.cat([prompt_mask.bool(), generated], dim=1)
    call = Caller(model, plan, key_mask=key_mask, prompt_len=P)
    state = _opening(tokens, fixed, mask_id, P, P, block_steps)
    after = (lambda s: _eos_fill(s, plan.eos_id)) if cfg.eos_fill and plan.eos_id is not None else None
    for block in range(n_blocks):
        lo, hi = P + block * block_len, min(P + (block + 1) * block_len, T)
        state = state.advance(window=(lo, hi), block=block, step=0, prev_logits=None)
        kv = model.new_cache(B, T, device) if cache != "none" else None
        call.forget()
        forwards = [0]  # calls in this block: the first with a cache refreshes it

        def forward(state, block=block, lo=lo, hi=hi, kv=kv, forwards=forwards) -> View:
            forwards[0] += 1
            if kv is None:
                return call(state.tokens, None, block, 0, state)
            if forwards[0] == 1:  # refresh: a full pass that also fills the cache
                view = call(state.tokens, kv, -1, 0, state)
                kv.commit(lo if cache == "prefix" else T)
                return view
            if cache == "prefix":
                return call(state.tokens[:, lo:], kv, block, lo, state)
            kv.seek(lo)  # dual: rewrite the active block's K/V in place; the suffix stays cached
            view = call(state.tokens[:, lo:hi], kv, block, lo, state)
            kv.seek(None)
            return view

        while state.step < block_steps and state.masked.any():
            state = yield from _rounds(model, plan, state, forward, call, generators, after=after)
    yield state.advance(finished=torch.ones(B, dtype=torch.bool, device=device))


def _ar_loop(model: Denoiser, plan: DecodePlan, prompt, _, generators, prompt_mask):
    B, P = prompt.shape
    device = prompt.device
    fill = plan.eos_id if plan.eos_id is not None else model.mask_id  # what finished rows append
    stops = torch.tensor(plan.stop_ids, dtype=torch.long, device=device)
    kv = model.new_cache(B, P + plan.cfg.max_new_tokens, device) if plan.cache == "exact" else None
    state = _opening(prompt, torch.ones_like(prompt, dtype=torch.bool), model.mask_id, P, P, 1)
    for i in range(plan.cfg.max_new_tokens):
        if kv is not None:
            feed = state.tokens if i == 0 else state.tokens[:, -1:]
            logits = model(feed, cache=kv).logits[:, -1]
            kv.commit(feed.shape[1])
        else:
            logits = model(state.tokens).logits[:, -1]
        banned = plan.stop_ids if i < plan.cfg.min_new_tokens else plan.ban_ids  # no stop yet
        if banned:
            logits[:, list(banned)] = -torch.inf
        u = row_uniform(generators, 1, device)[:, 0]
        proposal = plan.decoder.propose(Distribution.from_logits(logits, model.mask_id), u)
        nxt = torch.where(state.finished, fill, proposal.tokens)
        n = state.tokens.shape[1]
        finished = state.finished | torch.isin(nxt, stops)
        state = state.advance(
            tokens=torch.cat([state.tokens, nxt[:, None]], dim=1),
            fixed=torch.cat([state.fixed, state.finished[:, None]], dim=1),
            window=(n, n + 1),
            block=i,
            step=1,
            nfe=state.nfe + 1,
            finished=finished,
            prev_logits=logits[:, None],  # [B, 1, V] what the token was drawn from
        )
        yield state
        if finished.all():
            break
    yield state.advance(finished=torch.ones(B, dtype=torch.bool, device=device))


def final_state(states: Iterator[DecodeState]) -> DecodeState:
    """Run a `generate()` iterator to the end; its last state."""
    state = None
    for state in states:  # noqa: B007 - the last one is the result
        pass
    if state is None:
        raise DecodeError("generate() yielded no state")
    return state


def completions(state: DecodeState, stop: int | tuple[int, ...] | None) -> list[list[int]]:
    """Generated token ids of each row (after the prompt), cut before the first stop token
    ([EOS], or any of several: a chat model's end of turn)."""
    stops = set() if stop is None else {stop} if isinstance(stop, int) else set(stop)
    out = []
    for row in state.tokens[:, state.prompt_len :].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out
