"""Perplexity of a saved checkpoint on a split of its own corpus: what `unmask eval ppl` prints.

The estimator is `unmask.training.perplexity.evaluate_perplexity` (NELBO bound for diffusion
models, exact for AR) on the weights `load_checkpoint` returns, with the checkpoint's own [eval]
settings (Monte Carlo samples, rows, seed) and precision unless overridden: on the validation split
that is exactly what training's validation printed for the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from unmask.config import ConfigError, replace
from unmask.data.corpus import DataError, prepare_data
from unmask.models.checkpoint import load_checkpoint
from unmask.schedules import build_schedule
from unmask.training.perplexity import Perplexity, evaluate_perplexity


def heldout_perplexity(
    run_dir: str | Path,
    *,
    split: str = "test",
    mc_samples: int | None = None,
    max_rows: int | None = None,
    soft: bool = False,
    precision: str | None = None,
    loaded=None,
    data: str | None = None,
    seq_len: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """`mc_samples`, `max_rows` (0 = all) and `precision` default to the checkpoint's config.
    `data` (a corpus: file, folder, `hf:NAME`) replaces the checkpoint's own, as pretrained
    directories have none; `seq_len` cuts its rows (default: the checkpoint's length, at most 1024)."""
    loaded = loaded or load_checkpoint(run_dir)
    cfg = loaded.config
    data_cfg = cfg.data
    if data is not None:
        length = seq_len or min(cfg.data.seq_len, 1024)
        length -= length % cfg.model.block_size if cfg.model.attention == "block_causal" else 0
        data_cfg = replace(cfg.data, corpus=data, seq_len=length)
    elif cfg.data.corpus == "none":
        raise DataError(f"{run_dir} is a pretrained directory with no corpus of its own: pass --data FILE")
    data = prepare_data(data_cfg, loaded.tokenizer, splits=(split,))
    max_rows = cfg.eval.max_rows if max_rows is None else max_rows
    if max_rows < 0:
        raise ConfigError(f"--max-rows must be >= 0 (0 = every row), got {max_rows}")
    rows = data.rows[split][: max_rows or None]
    return evaluate_perplexity(
        loaded.model,
        rows,
        build_schedule(cfg.noise.schedule, cfg.noise.eps),
        pad_id=loaded.tokenizer.pad_id,
        byte_lengths=loaded.tokenizer.byte_lengths(),
        eps=cfg.noise.eps,
        mc_samples=cfg.eval.mc_samples if mc_samples is None else mc_samples,
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
        precision=precision or cfg.train.precision,
        soft=soft,
        progress=progress,
    )
