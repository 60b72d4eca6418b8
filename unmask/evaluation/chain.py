"""Per-token log-probabilities of a text under any model kind, by the chain rule left to right.

Position i's value is `log p(x_i | x_<i)` with every later position of the text masked: for AR
models the exact next-token log-probability; for masked (MDLM) and block (BD3-LM) diffusion models
the log-probability of the left-to-right decoder that unmasks one token per forward pass (within
a block for BD3-LM, previous blocks clean) — a proper distribution over texts of that length, so
the values of any span sum to its log-probability given everything before it under that decoder.
Unlike the Monte Carlo NELBO (the lm-eval model's default), this needs no split point, which is
why the server's `echo` + `logprobs` uses it: the OpenAI protocol never says where a context ends.

The cost is one masked row per token for diffusion models (batched `ROWS` at a time); [MASK] is
never a prediction of a diffusion model (SUBS), as in its training loss; AR models keep the full
softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.models.transformer import autocast
from unmask.training.objectives import denoise

ROWS = 32  # masked rows per forward pass


@dataclass(frozen=True)
class ChainScores:
    logprobs: torch.Tensor  # [n] float64: log p(ids[i] | ids[:i]); position 0 (nothing before it) nan
    top_ids: torch.Tensor  # [n, k] the k likeliest tokens at each position (position 0: -1)
    top_logprobs: torch.Tensor  # [n, k] their log-probabilities


def _log_probs(logits: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """log-softmax; `mask_id` (diffusion models: SUBS) never a prediction. AR models keep the full
    softmax their loss was taken over."""
    logits = logits.float()
    if mask_id is not None:
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
    return logits.log_softmax(-1)


@torch.no_grad()
def chain_logprobs(model, ids: list[int], *, pad_id: int, k: int = 1, precision: str = "auto") -> ChainScores:
    """Every position's chain-rule log-probability, and its top-k, for `ids` (n >= 1 tokens)."""
    device = next(model.parameters()).device
    n, kind, mask = len(ids), model.cfg.attention, model.mask_id
    x = torch.tensor(ids, device=device)
    rows: list[torch.Tensor] = []  # [V] log-probs predicting position i, i = 1..n-1
    if kind == "causal":
        with autocast(precision, device.type):
            logits = model(x[None, :-1]).logits[0] if n > 1 else torch.empty(0, 1, device=device)
        rows = list(_log_probs(logits, None)) if n > 1 else []
    else:
        pad = -n % model.cfg.block_size if kind == "block_causal" else 0
        x0 = torch.cat([x, torch.full((pad,), pad_id, device=device)])  # [L], whole blocks
        for start in range(1, n, ROWS):
            positions = torch.arange(start, min(start + ROWS, n), device=device)  # [R]
            xt = x0.repeat(len(positions), 1)  # [R, L]: row r masks positions r.. of the text
            later = torch.arange(n, device=device)[None, :] >= positions[:, None]
            xt[:, :n] = torch.where(later, mask, xt[:, :n])
            with autocast(precision, device.type):
                logits = denoise(model, xt, x0.expand_as(xt))  # [R, L, V]
            picked = logits[torch.arange(len(positions), device=device), positions]  # [R, V]
            rows.extend(_log_probs(picked, mask))
    logprobs = torch.full((n,), float("nan"), dtype=torch.float64)
    top_ids = torch.full((n, k), -1, dtype=torch.long)
    top_lp = torch.full((n, k), float("nan"), dtype=torch.float64)
    if rows:
        lp = torch.stack(rows).cpu()  # [n - 1, V]
        logprobs[1:] = lp.gather(-1, x[1:, None].cpu()).squeeze(-1).double()
        values, indices = lp.topk(k, dim=-1)
        top_ids[1:], top_lp[1:] = indices, values.double()
    return ChainScores(logprobs, top_ids, top_lp)


@torch.no_grad()
def greedy_next(model, ids: list[int], *, pad_id: int, precision: str = "auto") -> tuple[int, float]:
    """The likeliest token after `ids` (one more position, masked for diffusion models) and its
    log-probability: the chain's next step."""
    device = next(model.parameters()).device
    kind, mask, n = model.cfg.attention, model.mask_id, len(ids)
    if kind == "causal":
        with autocast(precision, device.type):
            logits = model(torch.tensor([ids], device=device)).logits[0, -1]
    else:
        pad = -(n + 1) % model.cfg.block_size if kind == "block_causal" else 0
        xt = torch.tensor([[*ids, mask] + [pad_id] * pad], device=device)
        with autocast(precision, device.type):
            logits = denoise(model, xt, xt)[0, n]  # x0 for the clean previous blocks: the text itself
    lp = _log_probs(logits, None if kind == "causal" else mask)
    best = int(lp.argmax())
    return best, float(lp[best])
