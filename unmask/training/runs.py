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
    "train.out",  # a moved or copied run resumes where it now is
    "data.cache_dir",  # where tokens are cached does not change them
    "data.num_proc",  # ... nor how many processes tokenize
    "data.streaming",  # ... nor whether a dataset is read as a stream
    "train.steps",
    "train.eval_every",
    "train.save_every",
    "train.keep_optimizer",
    "train.loggers",
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


# leftovers of a killed run: a checkpoint being written, a `latest` being replaced, FSDP shards
# not yet moved into a checkpoint, a manifest being written
LEFTOVERS = (".tmp-ckpt-*", ".latest.tmp*", ".dist-*", ".metrics.jsonl.tmp*")


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what killed processes left half-written in `run_dir`; the names removed."""
    gone = []
    for pattern in LEFTOVERS:
        for p in sorted(run_dir.glob(pattern)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def rewind_log(path: Path, step: int) -> tuple[int, int]:
    """Keep the records of `metrics.jsonl` up to `step` (what the resumed checkpoint had seen);
    a torn or corrupt line and everything after it are set aside in `metrics.jsonl.torn`. The log
    is rewritten through a temporary file and a rename. Returns (kept, set aside)."""
    import json
    import os

    if not path.exists():
        return 0, 0
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    kept, torn = [], []
    for i, raw in enumerate(lines):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            torn = lines[i:]
            break
        if record.get("step", 0) <= step:
            kept.append(raw)
    if torn:
        with (path.parent / (path.name + ".torn")).open("ab") as f:
            f.write(b"\n".join(torn) + b"\n")
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    with tmp.open("wb") as f:
        f.write(b"".join(line + b"\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(kept), len(torn)


class RunLock:
    """An advisory lock on a run directory held by the process that trains into it: a second
    writer is refused, naming the holder's pid. Released when the process ends, however it ends."""

    def __init__(self, run_dir: Path):
        import fcntl
        import os

        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise CheckpointError(
                f"{run_dir} is being trained by process {holder}; wait for it to finish or stop it "
                "(a second writer would corrupt its checkpoints)"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        import os

        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
