"""BD3-LM's clipped noise schedule: pick the mask-rate interval whose per-(row, block) training loss
has the smallest variance on validation rows (ALGORITHMS.md §2), re-run every validation round."""

from __future__ import annotations

import math

import numpy as np
import torch

from unmask.config import Config
from unmask.models.denoiser import Denoiser
from unmask.models.transformer import autocast
from unmask.schedules import NoiseSchedule, clip_candidates
from unmask.training.objectives import Batch, per_block_losses


def search_clip(
    model: Denoiser,
    rows: np.ndarray,
    schedule: NoiseSchedule,
    cfg: Config,
    pad_id: int,
    device: torch.device,
) -> tuple[tuple[float, float], float]:
    """The clipped range whose per-(row, block) loss variance on validation batches is smallest."""
    candidates = clip_candidates(cfg.noise.clip_widths, cfg.noise.clip_grid_step)
    best, best_var = (0.0, 1.0), math.inf
    n = min(len(rows), cfg.noise.clip_search_batches * cfg.train.batch_size)
    with torch.no_grad(), autocast(cfg.train.precision, device):
        for beta, omega in candidates:
            losses = []
            for start in range(0, n, cfg.train.batch_size):
                x0 = torch.as_tensor(np.asarray(rows[start : start + cfg.train.batch_size]), device=device)
                g = torch.Generator().manual_seed(cfg.train.seed + start)
                t_range = (max(beta, cfg.noise.eps), omega)
                losses.append(per_block_losses(model, Batch(x0, x0 != pad_id), schedule, g, t_range))
            var = float(torch.cat([x.flatten() for x in losses]).float().var())
            if var < best_var:
                best, best_var = (beta, omega), var
    return best, best_var
