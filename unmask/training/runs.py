"""A training run's directory and lifecycle: a directory that holds a run is continued, replaced or
refused; which config changes a resumed run accepts; SIGINT / SIGTERM turned into a checkpointed stop.
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unmask.config import Config, ConfigError
from unmask.config_io import to_dict
from unmask.models.checkpoint import CheckpointError

# Config fields that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = {
    "train.steps",
    "train.eval_every",
    "train.save_every",
    "train.keep_optimizer",
    "train.precision",  # `auto` may resolve differently on another machine
    "dist.strategy",
    "dist.activation_checkpointing",
    "dist.consolidate",
}
# What marks a directory as holding a run.
RUN_FILES = ("latest", "metrics.jsonl", "ckpt-*", ".tmp-ckpt-*", ".dist-*")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step; a checkpoint of that step was written."""

    def __init__(self, run_dir: Path, step: int, signal_name: str):
        super().__init__(f"{signal_name}: stopped after step {step}; checkpoint saved in {run_dir}")
        self.run_dir, self.step, self.signal_name = run_dir, step, signal_name


@contextmanager
def stop_requests():
    """Yield a dict whose `signal` is set by the first SIGINT/SIGTERM; a second SIGINT stops at once.
    Outside the main thread (where handlers cannot be set) nothing is installed."""
    request: dict[str, str | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request["signal"] = signal.Signals(signum).name
        print(
            f"\n{request['signal']}: finishing this step, then saving a checkpoint "
            "(Ctrl-C again stops at once, losing the steps since the last checkpoint)",
            file=sys.stderr,
        )

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """A directory that already holds a run is continued (--resume), replaced (--overwrite) or refused."""
    held = [p for pattern in RUN_FILES for p in run_dir.glob(pattern)]
    if not held or resume:
        return
    if not overwrite:
        names = sorted(p.name for p in held)
        raise CheckpointError(
            f"{run_dir} already holds a run ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --train.out"
        )
    for p in held:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_resume_compatible(saved: Config, new: Config) -> None:
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
    changed = sorted(k for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(
            "--resume: the config differs from the checkpoint's in "
            + ", ".join(f"--{k} ({a[k]!r} -> {b[k]!r})" for k in changed)
        )
