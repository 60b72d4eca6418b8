"""Token shards on disk: a split tokenized once into fixed-width files, read by memmap.

A split's folder holds `shard-00000.bin`, ... (the documents' tokens concatenated, without
specials, as `uint16` when the vocabulary fits in 16 bits, else `uint32`), `offsets.bin` (int64
`[N_docs + 1]`: document d is tokens `offsets[d]:offsets[d+1]`) and `index.json` (dtype, shard
sizes, SHA-256 digests). It is written in a temporary folder renamed into place when complete, so a
killed preparation leaves nothing that reads as a split.

Rows are views: `WrapRows` (the stream `[BOS] doc [EOS] [BOS] doc [EOS] ...` cut into `L`-token
rows) and `PadRows` (one document per row) gather a batch's tokens from the shards when indexed, so
neither preparing nor training holds the corpus in memory: what grows with it is 8 bytes per
document (the offsets) and the OS page cache.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmask.integrity import fsync_tree, is_write_error, sha256, write_failed

SHARD_TOKENS = 1 << 26  # tokens per shard file (128 MiB of uint16)
VERIFY_BYTES = 1 << 30  # shards up to this size in all are checked against their digests on open


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents' token ids to one split's shards; `close()` makes the folder appear."""

    def __init__(self, folder: Path, vocab_size: int, shard_tokens: int = SHARD_TOKENS):
        self.folder, self.dtype, self.shard_tokens = Path(folder), token_dtype(vocab_size), shard_tokens
        self.tmp = self.folder.with_name(f"{self.folder.name}.tmp{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.shards: list[dict] = []  # the closed shard files: name, tokens
        self.shard = None  # the open shard file and the tokens in it
        self.in_shard = 0
        self.n_tokens = 0
        self.n_docs = 0
        self.offsets = (self.tmp / "offsets.bin").open("wb")
        self.offsets.write(np.zeros(1, dtype=np.int64).tobytes())

    def add(self, docs: list[np.ndarray]) -> None:
        """Documents' token ids (each a 1-d integer array), in corpus order; written at once (a
        document may run on into the next shard file)."""
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        self._write(self.offsets, (self.n_tokens + np.cumsum(lengths)).astype(np.int64), self.tmp)
        self.n_tokens += int(lengths.sum())
        self.n_docs += len(docs)
        flat = (
            np.concatenate(docs).astype(self.dtype, copy=False)
            if len(docs) > 1
            else docs[0].astype(self.dtype)
        )
        while len(flat):
            if self.shard is None:
                self.shard = (self.tmp / f"shard-{len(self.shards):05d}.bin").open("wb")
            room = self.shard_tokens - self.in_shard
            self._write(self.shard, flat[:room], Path(self.shard.name))
            self.in_shard += min(room, len(flat))
            flat = flat[room:]
            if self.in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self.shard.close()
        self.shards.append({"file": Path(self.shard.name).name, "tokens": self.in_shard})
        self.shard, self.in_shard = None, 0

    @staticmethod
    def _write(f, array: np.ndarray, path: Path) -> None:
        try:
            f.write(array.tobytes())
        except OSError as e:
            if is_write_error(e):
                raise write_failed(path, e, array.nbytes) from None
            raise

    def close(self) -> TokenShards:
        try:
            if self.shard is not None:
                self._close_shard()
            self.offsets.close()
            for s in self.shards:
                s["sha256"] = sha256(self.tmp / s["file"])
            index = {"dtype": self.dtype.name, "n_tokens": self.n_tokens, "n_docs": self.n_docs,
                     "shards": self.shards, "offsets_sha256": sha256(self.tmp / "offsets.bin")}  # fmt: skip
            (self.tmp / "index.json").write_text(json.dumps(index, indent=1))
            fsync_tree(self.tmp)
        except OSError as e:
            self.abort()
            if is_write_error(e):
                raise write_failed(self.folder, e) from None
            raise
        except BaseException:
            self.abort()
            raise
        try:
            os.rename(self.tmp, self.folder)  # atomic: the folder appears complete or not at all
        except OSError:  # another process finished the same split first: theirs is as good
            shutil.rmtree(self.tmp, ignore_errors=True)
        return TokenShards.open(self.folder)

    def abort(self) -> None:
        for f in (self.offsets, self.shard):
            if f is not None and not f.closed:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass(frozen=True)
class TokenShards:
    """A split's tokens, memory-mapped: `take(positions)` gathers from every shard."""

    folder: Path
    maps: tuple[np.ndarray, ...]  # one memmap per shard
    starts: np.ndarray  # [S + 1] int64: shard s holds positions starts[s]:starts[s+1]
    offsets: np.ndarray  # [N_docs + 1] int64, memory-mapped

    @classmethod
    def open(cls, folder: Path) -> TokenShards:
        index = json.loads((folder / "index.json").read_text())
        dtype = np.dtype(index["dtype"])
        maps = tuple(np.memmap(folder / s["file"], dtype=dtype, mode="r") for s in index["shards"])
        starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in index["shards"]])]).astype(np.int64)
        offsets = np.memmap(folder / "offsets.bin", dtype=np.int64, mode="r")
        return cls(folder, maps, starts, offsets)

    @staticmethod
    def complete(folder: Path) -> bool:
        """An index whose files all have their recorded sizes (and, up to VERIFY_BYTES in all, their
        digests); a damaged split is reported and tokenized again."""
        try:
            index = json.loads((folder / "index.json").read_text())
            width = np.dtype(index["dtype"]).itemsize
            files = [(folder / s["file"], s["tokens"] * width, s["sha256"]) for s in index["shards"]]
            files.append((folder / "offsets.bin", 8 * (index["n_docs"] + 1), index["offsets_sha256"]))
        except (OSError, ValueError, KeyError, TypeError):
            return False
        ok = all(p.is_file() and p.stat().st_size == size for p, size, _ in files)
        if ok and sum(size for _, size, _ in files) <= VERIFY_BYTES:
            ok = all(sha256(p) == digest for p, _, digest in files)
        if not ok:
            print(f"token shards {folder} are damaged; tokenizing again", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
        return ok

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at `positions` (any shape, int64) as int64."""
        out = np.empty(positions.shape, dtype=np.int64)
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.maps[s][positions[sel] - self.starts[s]]
        return out

    @property
    def tokens(self) -> np.ndarray:
        """Every token, in memory (for tests and small splits)."""
        return self.take(np.arange(len(self), dtype=np.int64))


class _Rows:
    """`[N, L]` int64 rows gathered on indexing; `np.asarray(rows)` materialises them all."""

    dtype = np.dtype(np.int64)

    def __init__(self, n_rows: int, seq_len: int):
        self.shape = (n_rows, seq_len)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):
            return self[index[0]][(slice(None), *index[1:])]
        if isinstance(index, slice):
            return self._rows(np.arange(*index.indices(len(self)), dtype=np.int64))
        rows = np.asarray(index, dtype=np.int64)
        if rows.ndim == 0:
            return self[rows[None]][0]
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return self._rows(np.where(rows < 0, rows + len(self), rows))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _rows(self, rows: np.ndarray) -> np.ndarray:  # [B] -> [B, L]
        raise NotImplementedError


class WrapRows(_Rows):
    """The `wrap` packing: `[BOS] doc [EOS]` for every document, concatenated and cut into rows of
    `seq_len`; the tail shorter than a row is dropped."""

    def __init__(self, shards: TokenShards, seq_len: int, bos: int, eos: int):
        self.shards, self.bos, self.eos = shards, bos, eos
        n = shards.n_docs
        self.wrapped = np.asarray(shards.offsets[:n]) + 2 * np.arange(n, dtype=np.int64)  # [D] doc starts
        super().__init__((len(shards) + 2 * n) // seq_len, seq_len)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        pos = rows[:, None] * self.shape[1] + np.arange(self.shape[1], dtype=np.int64)  # [B, L]
        doc = np.searchsorted(self.wrapped, pos, side="right") - 1
        k = pos - self.wrapped[doc]  # 0 = [BOS], 1..n = the document, n + 1 = [EOS]
        length = np.asarray(self.shards.offsets[doc + 1]) - np.asarray(self.shards.offsets[doc])
        body = (k >= 1) & (k <= length)
        out = np.where(k == 0, self.bos, self.eos).astype(np.int64)
        out[body] = self.shards.take(np.asarray(self.shards.offsets[doc[body]]) + k[body] - 1)
        return out


class PadRows(_Rows):
    """The `pad` packing: one `[BOS] doc [EOS]` per row, truncated to `seq_len` or padded."""

    def __init__(self, shards: TokenShards, seq_len: int, bos: int, eos: int, pad: int):
        self.shards, self.bos, self.eos, self.pad = shards, bos, eos, pad
        super().__init__(shards.n_docs, seq_len)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        start = np.asarray(self.shards.offsets[rows])[:, None]  # [B, 1]
        length = np.asarray(self.shards.offsets[rows + 1])[:, None] - start
        k = np.arange(self.shape[1], dtype=np.int64)[None, :]  # [1, L]
        body = (k >= 1) & (k <= length)
        out = np.where(k == 0, self.bos, np.where(k == length + 1, self.eos, self.pad)).astype(np.int64)
        out[body] = self.shards.take((start + k - 1)[body])
        return out
