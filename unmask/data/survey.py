"""The survey pass: one streamed read of a corpus that routes every document to its split and
digests the content, so later passes (the BPE, tokenization) need no document in memory and caches
are keyed by what the corpus holds, not where it lives.

Every document gets a stable key (relative path, line number, ...); the train/validation/test
split is decided by a hash of that key, so it never depends on file order or on other documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from unmask.config import DataConfig
from unmask.data.sources import SPLITS, DataError, iter_documents, source_files


def corpus_key(cfg: DataConfig) -> str:
    return f"{cfg.corpus}|{cfg.txt_documents}|{cfg.valid_fraction}|{cfg.test_fraction}|{cfg.text_field}"


def _key_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _split_of(key: str, valid_fraction: float, test_fraction: float) -> str:
    h = _key_hash(key)
    if h < test_fraction:
        return "test"
    if h < test_fraction + valid_fraction:
        return "validation"
    return "train"


@dataclass(frozen=True)
class Survey:
    """One streamed pass over a corpus: what every later pass needs to route documents to splits
    and to key caches by content, without holding the documents."""

    digest: str  # SHA-256 of every (key, text): an edited file gives another digest
    docs: dict[str, int]  # split -> documents
    chars: int  # characters in all (the progress bar's total)
    moved: dict[str, str]  # key -> held-out split: the lowest-hash training documents moved there

    def split_of(self, key: str, given: str | None, valid_fraction: float, test_fraction: float) -> str:
        return given or self.moved.get(key) or _split_of(key, valid_fraction, test_fraction)


def _documents(cfg: DataConfig):
    """(key, text, given split) of the corpus's non-empty documents, streamed."""
    docs = iter_documents(cfg.corpus, txt_documents=cfg.txt_documents, text_field=cfg.text_field,
                          streaming=cfg.streaming)  # fmt: skip
    return ((k, t, s) for k, t, s in docs if t.strip())


def survey_corpus(cfg: DataConfig, memo: Path | None = None) -> Survey:
    """Split sizes and the content digest of a corpus (one pass; with `memo`, a folder, remembered
    for local sources by their files' paths, sizes and modification times).

    Documents go to splits by a hash of their key; where that leaves a held-out split empty of a
    corpus with at least three documents, the training document whose key hashes lowest moves
    there."""
    stamp = None
    files = source_files(cfg.corpus) if memo is not None else None
    if files is not None:
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        stamp = hashlib.sha256(json.dumps([corpus_key(cfg), stats]).encode()).hexdigest()[:20]
        try:
            return Survey(**json.loads((memo / f"{stamp}.json").read_text()))
        except (OSError, ValueError, TypeError):
            pass
    h, docs, chars, given_splits = hashlib.sha256(), dict.fromkeys(SPLITS, 0), 0, False
    lowest: list[tuple[float, str]] = []  # the two training keys that hash lowest
    for key, text, given in _documents(cfg):
        h.update(key.encode("utf-8", "surrogatepass") + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
        chars += len(text)
        given_splits |= given is not None
        split = given or _split_of(key, cfg.valid_fraction, cfg.test_fraction)
        docs[split] += 1
        if split == "train":
            lowest = sorted([*lowest, (_key_hash(key), key)])[:2]
    moved = {}
    for s in ("validation", "test"):
        if not given_splits and not docs[s] and docs["train"] >= 2:
            _, key = lowest.pop(0)
            moved[key], docs[s], docs["train"] = s, 1, docs["train"] - 1
    survey = Survey(h.hexdigest()[:20], docs, chars, moved)
    _check_splits(cfg.corpus, docs)
    if stamp is not None:
        memo.mkdir(parents=True, exist_ok=True)
        tmp = memo / f"{stamp}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(dataclasses.asdict(survey)))
        os.replace(tmp, memo / f"{stamp}.json")
    return survey


def _check_splits(spec: str, docs: dict[str, int]) -> None:
    if not any(docs.values()):
        raise DataError(f"corpus {spec!r} has no non-empty documents")
    for s in SPLITS:
        if not docs[s]:
            raise DataError(
                f"corpus {spec!r}: the {s} split is empty ({sum(docs.values())} "
                "documents in all, at least 3 are needed); give a bigger corpus, or split a "
                ".txt file into more documents (--data.txt_documents chunks or blank_lines)"
            )
