"""A training run's set-up, in stages: where it starts (`--resume`, `--init` a run or a pretrained
base), its data, its model with the starting weights, its optimizer. `unmask.training.loop` runs it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmask.config import Config, ConfigError, replace
from unmask.config_io import config_from_json
from unmask.data.corpus import PreparedData, prepare_data
from unmask.data.instruct import prepare_instruct
from unmask.models.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    load_checkpoint,
    load_state_dict_strict,
    resolve_checkpoint,
    verify_checkpoint,
)
from unmask.models.denoiser import Denoiser
from unmask.models.pretrained.load import is_pretrained_dir
from unmask.models.transformer import build_model
from unmask.training.runs import check_resume_compatible


def on_pretrained(cfg: Config, init: str, device) -> tuple[Config, torch.nn.Module, Any]:
    """`--init` a pretrained directory: its model, frozen, with the run's trainable additions
    (soft-mask scalars, LoRA); the run's model config becomes the base's."""
    from unmask.models.pretrained.additions import attach
    from unmask.models.pretrained.load import load_as_checkpoint

    if cfg.soft_mask.k == 0 and cfg.lora.r == 0:
        raise ConfigError(
            f"--init {init} is a pretrained model: its weights stay frozen, so train something "
            "on it: --soft-mask.k K (soft-masking) and/or --lora.r R (LoRA adapters)"
        )
    if cfg.train.ema > 0 or cfg.dist.strategy == "fsdp":
        raise ConfigError(
            "training on a pretrained base supports neither --train.ema nor --dist.strategy fsdp"
        )
    loaded = load_as_checkpoint(init, device=device, dtype="fp32" if device.type == "cpu" else "auto")
    model = (
        attach(loaded.model, soft_mask_k=cfg.soft_mask.k, lora=cfg.lora, soft_mask_init=cfg.soft_mask.init)
        .to(device)
        .train()
    )
    info = loaded.state["pretrained"]
    model.base_ref = {
        "path": info["path"],
        "digest": info["digest"],
        "family": info["family"],
        "dtype": info["dtype"],
    }
    return replace(cfg, model=loaded.model.cfg), model, loaded.tokenizer


def load_init(model: Denoiser, base: Denoiser, init: str) -> None:
    """Copy `base`'s weights into `model`. The only keys allowed to be missing are those of a
    soft-mask module the base does not have (continued training with soft-masking)."""
    missing = set(model.state_dict()) - set(base.state_dict())
    if base.soft_mask is None and model.soft_mask is not None:
        missing -= {n for n in model.state_dict() if n.startswith("soft_mask.")}
    result = None
    try:
        result = model.load_state_dict(base.state_dict(), strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"--init {init}: its weights do not fit --model: {e}") from e
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"--init {init}: its weights do not fit --model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )


@dataclass
class Start:
    """Where a run starts: its config, step, saved state, tokenizer and initial weights."""

    cfg: Config
    step: int = 0
    state: dict = field(default_factory=dict)  # the resumed checkpoint's state.json
    ckpt: Path | None = None  # the checkpoint resumed from
    tokenizer: Any = None
    on_base: torch.nn.Module | None = None  # a frozen pretrained base with trainable additions
    init_model: torch.nn.Module | None = None  # `--init` weights to copy into a fresh model


def start_of(cfg: Config, resume: bool, init: str | None, device) -> Start:
    """Stage 1: what the run continues from (`--resume`), or starts on (`--init`)."""
    if resume:
        run_dir = Path(cfg.train.out)
        if not complete_checkpoints(run_dir):  # killed before its first checkpoint was complete
            print(f"--resume: {run_dir} holds no complete checkpoint; starting from step 0", file=sys.stderr)
            return start_of(cfg, False, init, device)
        ckpt = resolve_checkpoint(run_dir)
        verify_checkpoint(ckpt)
        saved = config_from_json((ckpt / "config.json").read_text())
        check_resume_compatible(saved, cfg)
        state = json.loads((ckpt / "state.json").read_text())
        if state["step"] >= cfg.train.steps:
            raise ConfigError(
                f"--resume: the run in {run_dir} is finished (step {state['step']} of --train.steps "
                f"{cfg.train.steps}); pass --train.steps N with N > {state['step']} to train it further"
            )
        resumed = load_checkpoint(ckpt)
        on_base = resumed.model.to(device).train() if (ckpt / "base.json").is_file() else None
        return Start(cfg, state["step"], state, ckpt, resumed.tokenizer, on_base)
    if init is not None and is_pretrained_dir(init):
        cfg, on_base, tokenizer = on_pretrained(cfg, init, device)
        return Start(cfg, tokenizer=tokenizer, on_base=on_base)
    if init is not None:
        base = load_checkpoint(init, prefer_ema=True)
        if (base.path / "base.json").is_file():  # a run on a pretrained base: go on training its additions
            return Start(cfg, tokenizer=base.tokenizer, on_base=base.model.to(device).train())
        return Start(cfg, tokenizer=base.tokenizer, init_model=base.model)
    return Start(cfg)


def run_data(cfg: Config, tokenizer, data: PreparedData | None, progress: bool) -> PreparedData:
    """Stage 2: the prepared corpus (or instruction pairs for post-training)."""
    if data is None and cfg.instruct.stage != "none":
        if tokenizer is None:
            raise ConfigError(
                f"--instruct.stage {cfg.instruct.stage} post-trains a checkpoint: pass --init (or --resume)"
            )
        data = prepare_instruct(cfg, tokenizer, verbose=progress)
    return data or prepare_data(cfg.data, tokenizer, splits=("train", "validation"), verbose=progress)


def run_model(cfg: Config, start: Start, tokenizer, init: str | None, device) -> Denoiser:
    """Stage 3: the model to train, with the weights the run starts from (before any sharding)."""
    if start.on_base is not None:
        model = start.on_base
    else:
        model = build_model(
            cfg.model,
            tokenizer.vocab_size,
            tokenizer.mask_id,
            soft_mask_k=cfg.soft_mask.k,
            soft_mask_init=cfg.soft_mask.init,
        ).to(device)
        if start.init_model is not None:
            load_init(model, start.init_model, init)
        if start.ckpt is not None:  # full weights before any sharding (FSDP shards are read after it)
            load_state_dict_strict(model, start.ckpt / "model.safetensors")
    if cfg.train.compile:
        model.compile_blocks()
    return model


def run_optimizer(model: Denoiser, cfg: Config) -> tuple[torch.optim.Optimizer, list[float]]:
    """Stage 4: AdamW over the trainable weights; the soft-mask scalars get their own lr, no decay."""
    tc = cfg.train
    soft_params = list(model.soft_mask.parameters()) if model.soft_mask is not None else []
    weights = [p for n, p in model.named_parameters() if not n.startswith("soft_mask.") and p.requires_grad]
    groups = [{"params": weights, "weight_decay": tc.weight_decay}]
    base_lrs = [tc.lr]
    if soft_params:
        groups.append({"params": soft_params, "weight_decay": 0.0})
        base_lrs.append(cfg.soft_mask.lr)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas), base_lrs
