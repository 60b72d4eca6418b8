"""Perplexity of a saved checkpoint on a split of its own corpus: what `unmask eval ppl` prints.

The estimator is `unmask.training.perplexity.evaluate_perplexity` (NELBO bound for diffusion
models, exact for AR), on the weights `load_checkpoint` returns.
"""

from __future__ import annotations

from pathlib import Path

from unmask.data.corpus import prepare_data
from unmask.models.checkpoint import load_checkpoint
from unmask.schedules import build_schedule
from unmask.training.perplexity import Perplexity, evaluate_perplexity


def heldout_perplexity(run_dir: str | Path, *, mc_samples: int, split: str = "test",
                       max_rows: int = 0, soft: bool = False) -> Perplexity:
    loaded = load_checkpoint(run_dir)
    cfg = loaded.config
    data = prepare_data(cfg.data, loaded.tokenizer, splits=(split,))
    rows = data.rows[split][: max_rows or None]
    return evaluate_perplexity(loaded.model, rows, build_schedule(cfg.noise.schedule, cfg.noise.eps),
                               pad_id=loaded.tokenizer.pad_id,
                               byte_lengths=loaded.tokenizer.byte_lengths(), eps=cfg.noise.eps,
                               mc_samples=mc_samples, batch_size=cfg.eval.batch_size,
                               seed=cfg.eval.seed, precision="fp32", soft=soft)
