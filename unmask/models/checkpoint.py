"""Checkpoints: safetensors weights (+ EMA), optimizer state, config, tokenizer; atomic; strict.

Layout of a run directory:

    runs/NAME/
      latest                 -> name of the newest complete checkpoint (replaced atomically)
      ckpt-0000300/          model.safetensors, ema.safetensors?, optimizer.pt (newest N only),
                             config.json, tokenizer.json, state.json
      metrics.jsonl

A checkpoint is written into a temporary directory, renamed into place, and only then does
`latest` point at it: a kill at any moment leaves the previous checkpoint intact and `latest`
valid. Loading is strict: a missing, unexpected or misshapen tensor is an error that lists them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unmask.config import Config, ConfigError
from unmask.config_io import config_from_json, to_dict
from unmask.data.tokenizer import Tokenizer, TokenizerError
from unmask.models.denoiser import Denoiser
from unmask.models.transformer import build_model


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model; the message names the file."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: Denoiser,
    config: Config,
    tokenizer: Tokenizer,
    ema: Denoiser | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    keep_optimizer: int = 1,
    model_state: dict[str, torch.Tensor] | None = None,
    move_in: dict[str, Path] | None = None,
) -> Path:
    """Write `run_dir/ckpt-{step}` atomically and point `latest` at it. Every checkpoint's weights
    stay; only the newest `keep_optimizer` keep their optimizer state (the bulk of a checkpoint:
    `optimizer.pt`, or the sharded `dist/` of an FSDP run). `model_state` replaces
    `model.state_dict()` (a state gathered from shards); `move_in` folders (name -> path) are moved
    into the checkpoint before it is renamed into place."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:07d}"
    tmp = run_dir / f".tmp-ckpt-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    base_ref = getattr(model, "base_ref", None)  # additions trained on a frozen pretrained base
    if base_ref is not None and model_state is None:
        from unmask.models.pretrained.additions import delta_state, write_base

        model_state = delta_state(model)
        write_base(tmp, base_ref)
    weights = model.state_dict() if model_state is None else model_state
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()},
            str(tmp / "ema.safetensors"),
        )
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    if model.soft_mask is not None:  # the learned scalars, readable without loading the model
        (tmp / "soft_mask.json").write_text(json.dumps(model.soft_mask.values(), indent=2))
    if hasattr(tokenizer, "save"):  # a pretrained base's tokenizer stays in its directory
        tokenizer.save(tmp / "tokenizer.json")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
    for name, path in (move_in or {}).items():
        os.replace(path, tmp / name)
    if final.exists():  # a complete checkpoint of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(run_dir / "latest", final.name)
    for old in sorted(run_dir.glob("ckpt-*"))[:-keep_optimizer]:
        (old / "optimizer.pt").unlink(missing_ok=True)
        shutil.rmtree(old / "dist", ignore_errors=True)  # the weights stay in model.safetensors
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (via `latest`) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if (path / "latest").is_file():
        ckpt = path / (path / "latest").read_text().strip()
        if not ckpt.is_dir():
            raise CheckpointError(f"{path}/latest points at {ckpt.name}, which does not exist")
        return ckpt
    if (path / "model.safetensors").is_file():
        return path
    raise CheckpointError(
        f"no checkpoint at {path} (expected a run directory with `latest` or a "
        "checkpoint directory with model.safetensors)"
    )


def load_state_dict_strict(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors into `module`; list missing, unexpected and misshapen keys on mismatch."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: corrupt or truncated ({e})") from e
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(tensors)
        if tensors[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{file} does not match the model: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {shapes}"
        )
    module.load_state_dict(tensors, strict=True)


@dataclass
class Loaded:
    model: Denoiser  # the weights to evaluate/sample with (EMA when the checkpoint has them)
    config: Config
    tokenizer: Tokenizer
    state: dict[str, Any]
    path: Path  # the checkpoint directory


def load_checkpoint(
    path: str | Path,
    *,
    prefer_ema: bool = True,
    tokenizer: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
) -> Loaded:
    """Rebuild model + config + tokenizer from a run or checkpoint directory, or from a pretrained
    Hugging Face directory (LLaDA, Dream, SDAR, ...; `tokenizer` and `dtype` apply to those)."""
    from unmask.models.pretrained.load import is_pretrained_dir, load_as_checkpoint

    path = Path(path).expanduser()
    if is_pretrained_dir(path):
        return load_as_checkpoint(path, tokenizer=tokenizer, device=device, dtype=dtype or "auto")
    ckpt = resolve_checkpoint(path)
    try:
        config = config_from_json((ckpt / "config.json").read_text())
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{ckpt}: unreadable config.json/state.json: {e}") from e
    if (ckpt / "base.json").is_file():
        return _load_on_base(ckpt, config, state, device=device, dtype=dtype)
    try:
        tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.mask_id, soft_mask_k=config.soft_mask.k)
    weights = ckpt / "ema.safetensors"
    if not (prefer_ema and weights.is_file()):
        weights = ckpt / "model.safetensors"
    load_state_dict_strict(model, weights)
    return Loaded(model.to(device).eval(), config, tokenizer, state, ckpt)


def _load_on_base(ckpt: Path, config: Config, state: dict[str, Any], *, device, dtype) -> Loaded:
    """A run trained on a frozen pretrained base: the base (checked against its digest) plus the
    run's additions (soft-mask scalars, LoRA) from the checkpoint."""
    from unmask.models.pretrained.additions import attach, delta_state, read_base
    from unmask.models.pretrained.load import load_as_checkpoint

    base = read_base(ckpt)
    if not Path(base["path"]).is_dir():
        raise CheckpointError(f"{ckpt} was trained on the pretrained model at {base['path']}, which is gone")
    loaded = load_as_checkpoint(
        base["path"], tokenizer=base.get("tokenizer"), device=device, dtype=dtype or base.get("dtype", "auto")
    )
    digest = loaded.state["pretrained"]["digest"]
    if digest != base["digest"]:
        raise CheckpointError(
            f"{ckpt} was trained on {base['path']} with weights {base['digest']}; "
            f"the weights there now are {digest}"
        )
    model = attach(loaded.model, soft_mask_k=config.soft_mask.k, lora=config.lora)
    try:
        tensors = load_file(str(ckpt / "model.safetensors"), device=str(next(model.parameters()).device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt / 'model.safetensors'}: corrupt or truncated ({e})") from e
    expected = delta_state(model)
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"{ckpt}/model.safetensors does not fit its base + additions: missing "
            f"{sorted(set(expected) - set(tensors))[:5]}, unexpected "
            f"{sorted(set(tensors) - set(expected))[:5]}"
        )
    model.load_state_dict(tensors, strict=False)
    model.base_ref = base
    state = {**state, "pretrained": loaded.state["pretrained"]}
    return Loaded(model.eval(), config, loaded.tokenizer, state, ckpt)
