"""What a written file should be, and durable writes: manifests of digests, fsync, write errors.

Every checkpoint directory ends with `manifest.json` (written last, atomically): each file's size
and SHA-256. A checkpoint is complete when its manifest is there and every file matches it;
loading verifies it, so flipped bytes or a truncated file are an error naming the file instead of
weights that load and sample garbage. Weights are also checked for NaN / inf when loaded.

Write failures (disk full, quota, read-only file system, I/O error) surface as `WriteFailed`, a
one-line error naming the path and the bytes the write needed, after the partial files are removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
EXIT_WRITE_FAILED = 74  # sysexits' EX_IOERR: a write failed (a crash exits 1, a user error 2)


class IntegrityError(RuntimeError):
    """A file does not match its manifest, or holds non-finite weights; the message names it."""


class WriteFailed(OSError):
    """A write failed for lack of space or a broken medium; the partial output was removed."""


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, *, optional: Iterable[str] = ()) -> None:
    """`manifest.json`: size and SHA-256 of every file under `directory` (relative paths). Files
    under an `optional` prefix may be deleted later (old checkpoints' optimizer state)."""
    optional = tuple(optional)
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
            if rel.startswith(optional):
                files[rel]["optional"] = True
    tmp = directory / f".{MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise IntegrityError(f"{path} is unreadable ({e}): the checkpoint is damaged") from e


def verify(directory: Path, names: Iterable[str] | None = None, *, digests: bool = True) -> bool:
    """Check the files `names` (default: all listed) against the manifest; False when there is
    none (a checkpoint of an older version). Sizes always, SHA-256 with `digests`."""
    files = read_manifest(directory)
    if files is None:
        return False
    for name in files if names is None else names:
        if name not in files:
            continue
        path = directory / name
        want = files[name]
        if not path.is_file():
            if want.get("optional"):
                continue
            raise IntegrityError(f"{path} is missing (listed in {directory / MANIFEST})")
        if path.stat().st_size != want["bytes"]:
            raise IntegrityError(
                f"{path}: corrupt or truncated ({path.stat().st_size} bytes, {MANIFEST} says {want['bytes']})"
            )
        if digests and sha256(path) != want["sha256"]:
            raise IntegrityError(f"{path}: corrupt (its SHA-256 does not match {directory / MANIFEST})")
    return True


def check_finite(tensors: dict, where: Path) -> None:
    """Every floating-point tensor finite, else an error naming the file and the tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise IntegrityError(f"{where}: tensor {name} holds NaN or inf values")


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories themselves (new names included)."""
    for p in sorted(directory.rglob("*"), reverse=True):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)
    for d in directory.rglob("*"):
        if d.is_dir():
            fsync_dir(d)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _errno_in(text: str) -> int | None:
    """The errno a wrapped report names: safetensors' "... (os error 28)"."""
    match = re.search(r"os error (\d+)", text)
    return int(match.group(1)) if match else None


def is_write_error(e: BaseException) -> bool:
    """An OSError of a full / read-only / failing medium, or a library's wrapped report of one
    (torch.save: "unexpected pos", safetensors: "I/O error ... (os error 28)")."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return True
    text = str(e)
    return _errno_in(text) in WRITE_ERRNOS or "unexpected pos" in text or "file write failed" in text


def write_failed(path: Path, e: BaseException, needed: int | None = None) -> WriteFailed:
    code = e.errno if isinstance(e, OSError) and e.errno else _errno_in(str(e))
    reason = os.strerror(code) if code else str(e).splitlines()[0]
    try:
        free = f"{shutil.disk_usage(path if path.is_dir() else path.parent).free:,}"
    except OSError:
        free = "unknown"
    need = f"; it needed about {needed:,} bytes" if needed else ""
    return WriteFailed(errno.EIO, f"cannot write {path}: {reason}{need} ({free} bytes free there)")
