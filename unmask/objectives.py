"""Pure loss functions: MDLM and BD3-LM NELBOs (SUBS parameterization) and AR cross-entropy.

Each takes `(model, batch, schedule, generator, ...)` and returns `LossOutput(loss, nats, tokens)`:
`nats` is the summed (weighted) negative log-likelihood, `tokens` the number of real tokens, and
`loss = nats / tokens` (nats per token; exp of it is the perplexity bound).

MDLM (Sahoo et al. 2024): `E_t[w(t) sum_{i masked} -log p(x0_i | x_t)]`. BD3-LM (Arriola et al.
2025): one t per (sequence, block), stratified over the batch x blocks grid, all blocks in ONE
forward over `[x_t ; x0]`. With L' = L the BD3-LM loss is the MDLM loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from unmask.kv_cache import KVCache
from unmask.masks import bd3_train, block_causal, dense_mask
from unmask.model import Transformer
from unmask.schedules import NoiseSchedule, stratified_times


class Batch(NamedTuple):
    x0: torch.Tensor  # [B, L] clean tokens
    valid: torch.Tensor  # [B, L] bool, False at [PAD] (no loss, never masked)


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, nats per token (differentiable)
    nats: float  # summed weighted NLL
    tokens: int  # real tokens counted


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterization: [B, L, V] log-probs with the mask logit at -inf, and unmasked
    positions forced to copy their input token (log-prob 0 there, -inf elsewhere)."""
    logp = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
    logp = logp.log_softmax(-1)
    copy = torch.full_like(logp, -torch.inf).scatter_(-1, xt[..., None], 0.0)
    return torch.where((xt == mask_id)[..., None], logp, copy)


def masked_nll(logits: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p(x0_i | x_t) under SUBS at every position (callers keep the masked ones): [B, L]."""
    logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
    return F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)


def block_times(B: int, n_blocks: int, t_range: tuple[float, float],
                generator: torch.Generator) -> torch.Tensor:
    """One t per (row, block), stratified over the B x n_blocks grid: [B, n_blocks]."""
    return stratified_times(B * n_blocks, *t_range, generator).view(B, n_blocks)


def _rand_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Noise is drawn on the CPU generator and moved: seeded runs match across devices.
    return torch.rand(x.shape, generator=generator).to(x.device)


def corrupt(x0: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
            mask_id: int, generator: torch.Generator, *,
            resample: tuple[float, float, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each valid token independently with prob 1 - alpha(t) of its block.

    t: [B, Nb]. `resample=(beta, omega, tries)` redraws blocks whose masked fraction falls outside
    [beta, omega], at most `tries` times. Returns (xt [B, L], masked [B, L] bool).
    """
    B, L = x0.shape
    block = L // t.shape[1]
    rate = (1 - schedule.alpha(t)).repeat_interleave(block, dim=1)  # [B, L]
    masked = (_rand_like(x0, generator) < rate) & valid
    if resample is not None:
        beta, omega, tries = resample
        for _ in range(tries):
            frac = masked.view(B, -1, block).float().mean(-1)  # [B, Nb]
            bad = ((frac < beta) | (frac > omega)).repeat_interleave(block, dim=1)
            if not bad.any():
                break
            redraw = (_rand_like(x0, generator) < rate) & valid
            masked = torch.where(bad, redraw, masked)
    return torch.where(masked, mask_id, x0), masked


def bd3_two_pass_logits(model: Transformer, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The same logits as `model.forward_bd3_train`, in two passes: x0 alone (block-causal) fills a
    K/V cache, then x_t attends to it with the offset block-causal mask. [B, L, V]."""
    B, L = x0.shape
    cfg = model.cfg
    cache = KVCache(cfg.n_layers, B, cfg.n_heads, cfg.dim // cfg.n_heads, 2 * L, device=x0.device)
    pos = torch.arange(L, device=x0.device)
    model.run(model.embed(x0), pos, dense_mask(block_causal(cfg.block_size), pos, pos), cache)
    cache.commit(L)
    # Key order in the cache is [x0 ; x_t]; index them as in the [x_t ; x0] layout for the mask.
    keys = torch.cat([pos + L, pos])
    mask = dense_mask(bd3_train(L, cfg.block_size), pos, keys)
    return model.head(model.run(model.embed(xt), pos, mask, cache))


def denoise(model: Transformer, xt: torch.Tensor, x0: torch.Tensor,
            xt_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Training-time logits for x_t [B, L, V]: BD3-LM's vectorized pass (block-causal models) or a
    plain forward (bidirectional); `xt_embeds` replaces x_t's input embeddings."""
    if model.cfg.attention == "block_causal":
        return model.forward_bd3_train(xt, x0, xt_embeds).logits
    return model(xt if xt_embeds is None else None, embeds=xt_embeds).logits


def soft_masked_logits(model: Transformer, xt: torch.Tensor, x0: torch.Tensor,
                       masked: torch.Tensor) -> torch.Tensor:
    """Soft-masking's two passes: a no-grad pass on x_t predicts p; the masked inputs become the
    blend of [MASK] and p's top-k; the second pass (with gradients, through the three scalars too)
    gives the logits the loss is taken on."""
    with torch.no_grad():
        first = denoise(model, xt, x0)
    embeds = model.soft_mask.blend(model.tok_embed, xt, masked, first[masked], model.mask_id)
    return denoise(model, xt, x0, embeds)


def diffusion_token_nll(model: Transformer, batch: Batch, schedule: NoiseSchedule,
                        generator: torch.Generator, t_range: tuple[float, float], *,
                        resample: tuple[float, float, int] | None = None,
                        two_pass: bool = False, soft_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted NLL `w(t_b) * -log p(x0_i | ...)` at masked positions (0 elsewhere) [B, L], and the
    per-block times [B, Nb]. Block-causal models use blocks of L'; others one block of L. With
    `soft_p` > 0 (a soft-mask model) the batch takes the two-pass soft-masked step with that
    probability (one draw per batch)."""
    x0, valid = batch
    B, L = x0.shape
    block = model.cfg.block_size if model.cfg.attention == "block_causal" else L
    t = block_times(B, L // block, t_range, generator).to(x0.device)  # [B, Nb]
    xt, masked = corrupt(x0, valid, t, schedule, model.mask_id, generator, resample=resample)
    soft = soft_p > 0 and float(torch.rand(1, generator=generator)) < soft_p
    if soft:
        if model.soft_mask is None:
            raise ValueError("soft-masked training needs a model built with a soft-mask module (k > 0)")
        logits = soft_masked_logits(model, xt, x0, masked)
    elif two_pass:
        logits = bd3_two_pass_logits(model, xt, x0)
    else:
        logits = denoise(model, xt, x0)
    w = schedule.weight(t).repeat_interleave(block, dim=1)  # [B, L]
    return torch.where(masked, w * masked_nll(logits, x0, model.mask_id), 0.0), t


def diffusion_loss(model: Transformer, batch: Batch, schedule: NoiseSchedule,
                   generator: torch.Generator, t_range: tuple[float, float], *,
                   resample: tuple[float, float, int] | None = None,
                   two_pass: bool = False, soft_p: float = 0.0) -> LossOutput:
    """MDLM (bidirectional) or BD3-LM (block-causal) NELBO in nats per token."""
    nll, _ = diffusion_token_nll(model, batch, schedule, generator, t_range,
                                 resample=resample, two_pass=two_pass, soft_p=soft_p)
    tokens = int(batch.valid.sum())
    nats = nll.sum()
    return LossOutput(nats / tokens, float(nats.detach()), tokens)


def ar_loss(model: Transformer, batch: Batch) -> LossOutput:
    """Next-token cross-entropy of a causal model; predicts tokens 1..L-1 of each row."""
    x0, valid = batch
    logits = model(x0[:, :-1]).logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), x0[:, 1:].flatten(), reduction="none")
    keep = valid[:, 1:].flatten()
    tokens = int(keep.sum())
    nats = nll[keep].sum()
    return LossOutput(nats / tokens, float(nats.detach()), tokens)


def per_block_losses(model: Transformer, batch: Batch, schedule: NoiseSchedule,
                     generator: torch.Generator, t_range: tuple[float, float]) -> torch.Tensor:
    """Mean weighted NLL of every (row, block): [B, Nb] (for the clipped-range search)."""
    nll, t = diffusion_token_nll(model, batch, schedule, generator, t_range)
    B, Nb = t.shape
    return nll.view(B, Nb, -1).mean(-1)
