"""The perplexity of a model on packed rows: the number training validates with and `eval ppl` prints.

Diffusion models (MDLM, BD3-LM) report the NELBO bound: `mc_samples` Monte Carlo draws of the
per-(row, block) times over the full range [eps, 1], averaged; `exp(nats/token)` upper-bounds
the true perplexity. AR models report the exact next-token perplexity on the same rows. Bits per
byte divide the nats by ln 2 and by the UTF-8 bytes the scored tokens stand for, so models with
different tokenizers compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from unmask.models.denoiser import Denoiser
from unmask.models.transformer import autocast
from unmask.schedules import NoiseSchedule
from unmask.training.objectives import Batch, ar_loss, diffusion_loss


@dataclass(frozen=True)
class Perplexity:
    nats_per_token: float
    ppl: float
    bits_per_byte: float
    tokens: int  # scored tokens per Monte Carlo sample
    rows: int
    mc_samples: int
    bound: bool  # True for the diffusion NELBO bound, False for exact AR perplexity

    def describe(self) -> str:
        """`<= 123.45 (NELBO bound, 4 MC samples, 64 rows)`: the number and how it was estimated."""
        how = f"NELBO bound, {self.mc_samples} MC samples" if self.bound else "exact"
        return f"{'<= ' if self.bound else ''}{self.ppl:.2f} ({how}, {self.rows} rows)"


@torch.no_grad()
def evaluate_perplexity(
    model: Denoiser,
    rows: np.ndarray,
    schedule: NoiseSchedule,
    *,
    pad_id: int,
    byte_lengths: np.ndarray,
    eps: float,
    mc_samples: int = 4,
    batch_size: int = 16,
    seed: int = 1234,
    precision: str = "fp32",
    soft: bool = False,
    loss_positions: np.ndarray | None = None,
    maskable: np.ndarray | None = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity (bound for diffusion models) of `model` on `rows` [N, L]. `soft` evaluates a
    soft-mask model through its two passes: the second pass's prediction is still a conditional
    p(x0 | x_t) (the soft inputs are a deterministic function of x_t), so the NELBO stays a bound.
    `loss_positions` [N, L] bool limits masking and scoring to those positions (instruction rows: the
    response given its prompt); default: every non-[PAD] token. `maskable` [N, L] widens where masks
    may fall (an SFT row's [EOS] tail, masked but unscored)."""
    if len(rows) == 0:
        raise ValueError("evaluate_perplexity: no rows to evaluate")
    is_ar = model.cfg.attention == "causal"
    samples = 1 if is_ar else mc_samples
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, tokens, n_bytes = 0.0, 0, 0
    starts = range(0, len(rows), batch_size)
    bar = tqdm(
        total=samples * len(starts), desc="perplexity", unit="batch", disable=not progress, leave=False
    )
    for mc in range(samples):
        for start in starts:
            bar.update(1)
            x0 = torch.as_tensor(np.asarray(rows[start : start + batch_size]), device=device)
            rows_at = slice(start, start + batch_size)
            valid = (
                x0 != pad_id
                if loss_positions is None
                else torch.as_tensor(np.asarray(loss_positions[rows_at]), device=device)
            )
            batch = Batch(x0, valid)
            if maskable is not None:  # masked over `maskable` (e.g. an [EOS] tail), scored on `valid`
                batch = Batch(x0, torch.as_tensor(np.asarray(maskable[rows_at]), device=device), None, valid)
            g = torch.Generator().manual_seed(seed * 1_000_003 + mc * 10_007 + start)
            with autocast(precision, device):
                if is_ar:
                    out = ar_loss(model, batch)
                else:
                    out = diffusion_loss(model, batch, schedule, g, (eps, 1.0), soft_p=1.0 if soft else 0.0)
            nats += out.nats
            tokens += out.tokens
            scored = batch.valid[:, 1:] if is_ar else batch.loss_positions
            scored_ids = (x0[:, 1:] if is_ar else x0)[scored].cpu().numpy()
            n_bytes += int(byte_lengths[scored_ids].sum())
    bar.close()
    model.train(was_training)
    nats_per_token = nats / tokens
    return Perplexity(
        nats_per_token=nats_per_token,
        ppl=math.exp(nats_per_token),
        bits_per_byte=nats / math.log(2) / max(n_bytes, 1),
        tokens=tokens // samples,
        rows=len(rows),
        mc_samples=samples,
        bound=not is_ar,
    )
