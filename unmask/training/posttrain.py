"""Post-training runs: instruction SFT and R2FT through the training loop (`train(init=...)`).

SFT and R2FT runs are ordinary training runs started from a checkpoint whose config has
`instruct.stage` set: same loop, checkpoints, resume and metrics.jsonl as pre-training. ADJUST
sampler training lives in `unmask.training.adjust`.
"""

from __future__ import annotations

from pathlib import Path

from unmask.config import Config, ConfigError, replace
from unmask.models.checkpoint import load_checkpoint

# Post-training defaults on top of the checkpoint's own config (every field stays overridable).
# From the Conv/R2FT authors' run scripts (ALGORITHMS.md §3): AdamW with weight decay 0.1; R2FT a
# few hundred steps inside a *fresh* 500-step warm-up, at a small fraction of SFT's learning rate,
# so its updates stay tiny.
STAGE_DEFAULTS = {
    "sft": {"steps": 1000, "warmup": 50, "weight_decay": 0.1},
    "r2ft": {"steps": 300, "warmup": 500, "weight_decay": 0.1},
}
R2FT_LR_FRACTION = 0.1  # R2FT's lr = this x the SFT checkpoint's lr


def instruct_config(
    checkpoint: str | Path, stage: str, *, out: str, data: str | None = None, template: str | None = None
) -> Config:
    """The config of an SFT or R2FT run from `checkpoint`: its own config with `instruct.stage`
    set, `train.out = out` and the stage's defaults (STAGE_DEFAULTS)."""
    if stage not in STAGE_DEFAULTS:
        raise ConfigError(f"unknown post-training stage {stage!r} (use sft or r2ft)")
    from unmask.models.pretrained.load import is_pretrained_dir, pretrained_config

    if is_pretrained_dir(checkpoint):  # its config.json alone: no weights are read here
        base = pretrained_config(checkpoint)
    else:
        base = load_checkpoint(checkpoint).config
    instruct = replace(
        base.instruct,
        stage=stage,
        **({"data": data} if data else {}),
        **({"template": template} if template else {}),
    )
    if stage == "r2ft" and base.instruct.stage != "sft":
        import sys

        print(
            f"note: {checkpoint} was not post-trained with SFT (its instruct.stage is "
            f"{base.instruct.stage!r}); R2FT is meant to follow SFT (Conv, Seo et al. 2025); "
            "running it anyway",
            file=sys.stderr,
        )
    train = replace(base.train, out=out, **STAGE_DEFAULTS[stage])
    if stage == "r2ft":
        train = replace(train, lr=base.train.lr * R2FT_LR_FRACTION)
    return replace(base, instruct=instruct, train=train)
