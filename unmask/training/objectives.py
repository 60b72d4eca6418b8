"""Pure loss functions: MDLM and BD3-LM NELBOs (SUBS parameterization) and AR cross-entropy.

Each takes `(model, batch, schedule, generator, ...)` and returns `LossOutput(loss, nats, tokens)`:
`nats` is the summed (weighted) negative log-likelihood, `tokens` the number of real tokens, and
`loss = nats / tokens` (nats per token; exp of it is the perplexity bound).

Instruction SFT is the same NELBO with only response positions masked and scored (`sft_loss`);
R2FT (Seo et al. 2025) is a preference loss on one forward with rule-made negatives (`r2ft_loss`).

MDLM (Sahoo et al. 2024): `E_t[w(t) sum_{i masked} -log p(x0_i | x_t)]`. BD3-LM (Arriola et al.
2025): one t per (sequence, block), stratified over the batch x blocks grid, all blocks in ONE
forward over `[x_t ; x0]`. With L' = L the BD3-LM loss is the MDLM loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from unmask.config import InstructConfig
from unmask.models.denoiser import TrainableDenoiser
from unmask.models.masks import bd3_train, block_causal, dense_mask
from unmask.schedules import NoiseSchedule, stratified_times


class Batch(NamedTuple):
    x0: torch.Tensor  # [B, L] clean tokens
    valid: torch.Tensor  # [B, L] bool, may be masked: False at [PAD]; SFT: the response (+ its tail)
    spans: torch.Tensor | None = None  # [B, 2] instruction rows: (response start, its [EOS] position)
    scored: torch.Tensor | None = None  # [B, L] bool, carries loss when it differs from `valid`

    @property
    def loss_positions(self) -> torch.Tensor:
        return self.valid if self.scored is None else self.scored


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, nats per token (differentiable)
    nats: float  # summed weighted NLL
    tokens: int  # real tokens counted
    extras: dict[str, float] | None = None  # loss-specific numbers worth logging


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


def block_times(
    B: int, n_blocks: int, t_range: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """One t per (row, block), stratified over the B x n_blocks grid: [B, n_blocks]."""
    return stratified_times(B * n_blocks, *t_range, generator).view(B, n_blocks)


def _rand_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Noise is drawn on the CPU generator and moved: seeded runs match across devices.
    return torch.rand(x.shape, generator=generator).to(x.device)


def corrupt(
    x0: torch.Tensor,
    valid: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    mask_id: int,
    generator: torch.Generator,
    *,
    resample: tuple[float, float, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
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


def bd3_two_pass_logits(model: TrainableDenoiser, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The same logits as `model.forward_bd3_train`, in two passes: x0 alone (block-causal) fills a
    K/V cache, then x_t attends to it with the offset block-causal mask. [B, L, V]."""
    B, L = x0.shape
    cfg = model.cfg
    cache = model.new_cache(B, 2 * L, x0.device)
    pos = torch.arange(L, device=x0.device)
    model.run(model.embed(x0), pos, dense_mask(block_causal(cfg.block_size), pos, pos), cache)
    cache.commit(L)
    # Key order in the cache is [x0 ; x_t]; index them as in the [x_t ; x0] layout for the mask.
    keys = torch.cat([pos + L, pos])
    mask = dense_mask(bd3_train(L, cfg.block_size), pos, keys)
    return model.head(model.run(model.embed(xt), pos, mask, cache))


def denoise(
    model: TrainableDenoiser, xt: torch.Tensor, x0: torch.Tensor, xt_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Training-time logits for x_t [B, L, V]: BD3-LM's vectorized pass (block-causal models) or a
    plain forward (bidirectional); `xt_embeds` replaces x_t's input embeddings."""
    if model.cfg.attention == "block_causal":
        return model.forward_bd3_train(xt, x0, xt_embeds).logits
    return model(xt if xt_embeds is None else None, embeds=xt_embeds).logits


def soft_masked_logits(
    model: TrainableDenoiser, xt: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """Soft-masking's two passes: a no-grad pass on x_t predicts p; the masked inputs become the
    blend of [MASK] and p's top-k; the second pass (with gradients, through the three scalars too)
    gives the logits the loss is taken on."""
    with torch.no_grad():
        first = denoise(model, xt, x0)
    embeds = model.soft_mask.blend(model.tok_embed, xt, masked, first[masked], model.mask_id)
    return denoise(model, xt, x0, embeds)


def diffusion_token_nll(
    model: TrainableDenoiser,
    batch: Batch,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    t_range: tuple[float, float],
    *,
    resample: tuple[float, float, int] | None = None,
    two_pass: bool = False,
    soft_p: float = 0.0,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted NLL `w(t_b) * -log p(x0_i | ...)` at masked positions (0 elsewhere) [B, L], and the
    per-block times [B, Nb]. Block-causal models use blocks of L'; others one block of L. With
    `soft_p` > 0 (a soft-mask model) the batch takes the two-pass soft-masked step with that
    probability (one draw per batch). `rows`: the noise is drawn for the whole batch, the model runs
    on these rows only (one process's share of a global batch), and both outputs cover them."""
    x0, valid = batch.x0, batch.valid
    B, L = x0.shape
    block = model.cfg.block_size if model.cfg.attention == "block_causal" else L
    t = block_times(B, L // block, t_range, generator).to(x0.device)  # [B, Nb]
    xt, masked = corrupt(x0, valid, t, schedule, model.mask_id, generator, resample=resample)
    soft = soft_p > 0 and float(torch.rand(1, generator=generator)) < soft_p
    scored = batch.loss_positions
    if rows is not None:
        x0, xt, masked, t, scored = x0[rows], xt[rows], masked[rows], t[rows], scored[rows]
    if soft:
        if model.soft_mask is None:
            raise ValueError("soft-masked training needs a model built with a soft-mask module (k > 0)")
        logits = soft_masked_logits(model, xt, x0, masked)
    elif two_pass:
        logits = bd3_two_pass_logits(model, xt, x0)
    else:
        logits = denoise(model, xt, x0)
    w = schedule.weight(t).repeat_interleave(block, dim=1)  # [B, L]
    return torch.where(masked & scored, w * masked_nll(logits, x0, model.mask_id), 0.0), t


def diffusion_loss(
    model: TrainableDenoiser,
    batch: Batch,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    t_range: tuple[float, float],
    *,
    resample: tuple[float, float, int] | None = None,
    two_pass: bool = False,
    soft_p: float = 0.0,
    rows: slice | None = None,
) -> LossOutput:
    """MDLM (bidirectional) or BD3-LM (block-causal) NELBO in nats per token. With `rows`, `nats`
    are those rows' and `loss` is their share of the whole batch's mean (divided by all its tokens)."""
    nll, _ = diffusion_token_nll(
        model,
        batch,
        schedule,
        generator,
        t_range,
        resample=resample,
        two_pass=two_pass,
        soft_p=soft_p,
        rows=rows,
    )
    tokens = int(batch.loss_positions.sum())
    nats = nll.sum()
    return LossOutput(nats / tokens, float(nats.detach()), tokens)


def ar_loss(model: TrainableDenoiser, batch: Batch, rows: slice | None = None) -> LossOutput:
    """Next-token cross-entropy of a causal model; predicts tokens 1..L-1 of each row. With `rows`,
    as `diffusion_loss`: those rows' nats over the whole batch's tokens."""
    tokens = int(batch.valid[:, 1:].sum())
    x0, valid = (batch.x0, batch.valid) if rows is None else (batch.x0[rows], batch.valid[rows])
    logits = model(x0[:, :-1]).logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), x0[:, 1:].flatten(), reduction="none")
    keep = valid[:, 1:].flatten()
    nats = nll[keep].sum()
    return LossOutput(nats / tokens, float(nats.detach()), tokens)


def per_block_losses(
    model: TrainableDenoiser,
    batch: Batch,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    t_range: tuple[float, float],
) -> torch.Tensor:
    """Mean weighted NLL of every (row, block): [B, Nb] (for the clipped-range search)."""
    nll, t = diffusion_token_nll(model, batch, schedule, generator, t_range)
    B, Nb = t.shape
    return nll.view(B, Nb, -1).mean(-1)


# ---------------------------------------------------------------------------------------------
# instruction tuning: SFT and R2FT


def sft_loss(
    model: TrainableDenoiser,
    batch: Batch,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    t_range: tuple[float, float],
    rows: slice | None = None,
) -> LossOutput:
    """Instruction SFT: the MDLM / BD3-LM NELBO where only `batch.valid` (the response positions)
    can be masked and carry loss, normalised by their count; the prompt is always visible."""
    return diffusion_loss(model, batch, schedule, generator, t_range, rows=rows)


class Negative(NamedTuple):
    cut: int  # c: positions >= c are masked; the answer prefix x0[:c] is visible
    unit: int  # g: the repeated unit is x0[c-g:c]
    span: int  # z: the rejected span is [c, c+z)
    phase: int  # the tiling starts at unit[phase]
    eos_at: int  # index inside the span of the one stray [EOS]


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def draw_negative(
    start: int, end: int, seq_len: int, cfg: InstructConfig, generator: torch.Generator
) -> Negative:
    """R2FT's rule for one row whose answer is [start, end): c uniform inside the answer, g in
    cfg.unit (at most the c - 1 visible tokens after [BOS]), z in cfg.span (cut to the row), a
    random phase and a random [EOS] position inside the span, never its last slot (a span ending
    in [EOS] would reject a well-ended answer)."""
    c = _randint(start, max(start, end - 1), generator)
    g = min(_randint(*cfg.unit, generator), c - 1)
    z = min(_randint(*cfg.span, generator), seq_len - c)
    if g < 1 or z < 1:
        raise ValueError(f"R2FT needs a visible token before the cut and room after it ({c=}, {seq_len=})")
    return Negative(c, g, z, _randint(0, g - 1, generator), _randint(0, max(0, z - 2), generator))


def rejected_span(row: torch.Tensor, neg: Negative, eos_id: int) -> torch.Tensor:
    """The rejected continuation [z]: the last g visible tokens tiled cyclically from `phase` for
    z - 1 tokens, with one [EOS] inserted at `eos_at`."""
    unit = row[neg.cut - neg.unit : neg.cut]
    tiled = unit[(neg.phase + torch.arange(neg.span - 1, device=row.device)) % neg.unit]
    eos = torch.tensor([eos_id], dtype=row.dtype, device=row.device)
    return torch.cat([tiled[: neg.eos_at], eos, tiled[neg.eos_at :]])


def r2ft_loss(
    model: TrainableDenoiser,
    batch: Batch,
    cfg: InstructConfig,
    eos_id: int,
    generator: torch.Generator,
    negatives: list[Negative] | None = None,
    rows: slice | None = None,
) -> LossOutput:
    """Rejective fine-tuning, one forward per row on x_t = x0 with every position >= c masked:

        loss = -log sigmoid(b_w mean_A log pi(y_w) - b_l mean_R log pi(y_l) - gamma) - b_a mean_A log pi(y_w)

    A = the whole answer plus its [EOS] (if in the row): the mean is over all of A, where the visible
    prefix before c contributes log pi = 0 (SUBS copies visible tokens), as the authors normalise;
    R = the rejected span [c, c+z) whose tokens y_l come from `rejected_span`; log pi are the SUBS
    log-probs of the one forward. The negatives are drawn fresh here unless given. `nats` /
    `tokens` are the summed loss / rows."""
    x0, spans = batch.x0, batch.spans
    if spans is None:
        raise ValueError("r2ft_loss needs instruction rows (Batch.spans)")
    B, L = x0.shape
    pos = torch.arange(L, device=x0.device)
    negatives = negatives or [draw_negative(int(a), int(e), L, cfg, generator) for a, e in spans.tolist()]
    if rows is not None:  # negatives drawn for the whole batch; this process scores its rows
        x0, spans, negatives = x0[rows], spans[rows], negatives[rows]
    B_all, B = B, x0.shape[0]
    cut = torch.tensor([n.cut for n in negatives], device=x0.device)[:, None]  # [B, 1]
    xt = torch.where(pos >= cut, model.mask_id, x0)
    answer = (pos >= spans[:, :1]) & (pos <= spans[:, 1:2].clamp(max=L - 1))  # A: [B, L]
    chosen = answer & (pos >= cut)  # where A is masked: the only positions with log pi != 0
    y_l, rejected = x0.clone(), torch.zeros_like(chosen)
    for b, n in enumerate(negatives):
        y_l[b, n.cut : n.cut + n.span] = rejected_span(x0[b], n, eos_id)
        rejected[b, n.cut : n.cut + n.span] = True
    logits = (
        model(xt).logits.float().index_fill(-1, torch.tensor([model.mask_id], device=x0.device), -torch.inf)
    )
    logp = logits.log_softmax(-1)  # [B, L, V]; every scored position is masked, so SUBS adds nothing
    lp_w = (logp.gather(-1, x0[..., None])[..., 0] * chosen).sum(1) / answer.sum(1)  # [B], mean over A
    lp_l = (logp.gather(-1, y_l[..., None])[..., 0] * rejected).sum(1) / rejected.sum(1)  # [B]
    margin = cfg.b_w * lp_w - cfg.b_l * lp_l - cfg.gamma
    per_row = -F.logsigmoid(margin) - cfg.b_a * lp_w
    loss = per_row.sum() / B_all
    lp_w_, lp_l_, margin_ = lp_w.detach(), lp_l.detach(), margin.detach()
    extras = {
        "chosen_logp": float(lp_w_.mean()),
        "rejected_logp": float(lp_l_.mean()),
        "margin": float(margin_.mean()),
        "accuracy": float((margin_ > 0).float().mean()),
    }
    return LossOutput(loss, float(per_row.sum().detach()), B_all, extras)
