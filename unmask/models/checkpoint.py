"""Checkpoints: safetensors weights (+ EMA), optimizer state, config, tokenizer; atomic; strict.

Layout of a run directory:

    runs/NAME/
      latest                 -> name of the newest complete checkpoint (replaced atomically)
      ckpt-0000300/          model.safetensors, ema.safetensors?, optimizer.pt (newest N only),
                             config.json, tokenizer.json, state.json, manifest.json
      metrics.jsonl

A checkpoint is written into a temporary directory, closed by its `manifest.json` (each file's size
and SHA-256), fsynced, renamed into place, and only then does `latest` point at it: a kill at any
moment leaves the previous checkpoint intact, and a complete checkpoint is found whatever `latest`
says. Loading verifies the manifest and that the weights are finite, and is strict: a missing,
unexpected or misshapen tensor is an error that lists them. A full disk is a `WriteFailed` naming
the path, with the partial checkpoint removed.
"""

from __future__ import annotations

import errno
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
from unmask.integrity import (
    IntegrityError,
    WriteFailed,
    check_finite,
    fsync_dir,
    fsync_tree,
    is_write_error,
    verify,
    write_failed,
    write_manifest,
)
from unmask.models.denoiser import Denoiser
from unmask.models.transformer import build_model


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model; the message names the file."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


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
    base_ref = getattr(model, "base_ref", None)  # additions trained on a frozen pretrained base
    weights = model.state_dict() if model_state is None else model_state
    if base_ref is not None and model_state is None:
        from unmask.models.pretrained.additions import delta_state

        weights = delta_state(model)  # only the additions: the base is not copied
    needed = _bytes(weights) * (2 if ema is not None else 1) + (2 * _bytes(weights) if optimizer else 0)
    free = shutil.disk_usage(run_dir).free
    if free < needed:  # obviously too small: say so before writing anything
        raise WriteFailed(
            errno.ENOSPC,
            f"cannot write the step-{step} checkpoint in {run_dir}: it needs about {needed:,} bytes and "
            f"{free:,} are free; the previous checkpoint is untouched (free space, then --resume)",
        )
    try:
        tmp.mkdir()
        if base_ref is not None and model_state is None:
            from unmask.models.pretrained.additions import write_base

            write_base(tmp, base_ref)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors")
        )
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
        write_manifest(tmp, optional=("optimizer.pt", "dist/"))  # last: the checkpoint is complete
        fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            raise write_failed(tmp, e, needed) from None
        raise
    if final.exists():  # a complete checkpoint of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    try:
        _write_atomic(run_dir / "latest", final.name)
    except OSError as e:  # the checkpoint is complete (manifest): --resume finds it without `latest`
        if is_write_error(e):
            raise write_failed(run_dir / "latest", e) from None
        raise
    for old in sorted(run_dir.glob("ckpt-*"))[:-keep_optimizer]:
        (old / "optimizer.pt").unlink(missing_ok=True)
        shutil.rmtree(old / "dist", ignore_errors=True)  # the weights stay in model.safetensors
    return final


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints that are complete (a manifest whose sizes match), oldest first. A
    checkpoint of an older version (no manifest) counts when it has its weights and state."""
    out = []
    for ckpt in sorted(run_dir.glob("ckpt-*")):
        if not ckpt.is_dir():
            continue
        try:
            if verify(ckpt, digests=False) or (
                (ckpt / "model.safetensors").is_file() and (ckpt / "state.json").is_file()
            ):
                out.append(ckpt)
        except IntegrityError:
            continue
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory -> its newest complete checkpoint (whatever `latest` says: a kill between a
    checkpoint's rename and the `latest` update leaves a newer complete one); a checkpoint
    directory -> itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    complete = complete_checkpoints(path) if path.is_dir() else []
    if complete:
        return complete[-1]
    if (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        raise CheckpointError(f"{path}/latest points at {name}, which is missing or incomplete")
    raise CheckpointError(
        f"no checkpoint at {path} (expected a run directory with a complete ckpt-* or a "
        "checkpoint directory with model.safetensors)"
    )


def verify_checkpoint(ckpt: Path) -> None:
    """Every file of a checkpoint against its manifest (a resume reads them all)."""
    try:
        verify(ckpt)
    except IntegrityError as e:
        raise CheckpointError(str(e)) from e


def load_state_dict_strict(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors into `module`; list missing, unexpected and misshapen keys on mismatch."""
    try:
        verify(file.parent, [file.name])
        tensors = load_file(str(file))
        check_finite(tensors, file)
    except IntegrityError as e:
        raise CheckpointError(str(e)) from e
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
        verify(ckpt, ["config.json", "state.json", "tokenizer.json", "base.json", "soft_mask.json"])
    except IntegrityError as e:
        raise CheckpointError(str(e)) from e
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
    if dtype not in (None, "auto"):  # unmask's own weights are saved in fp32: cast when asked
        from unmask.models.pretrained.load import resolve_dtype

        model = model.to(resolve_dtype(dtype, torch.device(device)))
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
