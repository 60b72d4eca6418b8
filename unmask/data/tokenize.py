"""Tokenization into token shards: one streamed pass over the corpus, batches of documents through
the tokenizer (in `--data.num_proc` processes when asked, with a bounded number in flight), each
split's tokens appended to its `ShardWriter`. The shards are cached by the corpus's settings and
content, the tokenizer and the split.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import time
from pathlib import Path

import numpy as np

from unmask.config import DataConfig
from unmask.data.shards import ShardWriter, TokenShards
from unmask.data.survey import Survey, _documents, corpus_key
from unmask.data.tokenizer import Tokenizer


def _encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` (no specials), flat (uint32), and their lengths."""
    fast = getattr(tokenizer.hf, "encode_batch_fast", None)  # a `tokenizers` one: no offsets computed
    if isinstance(tokenizer, Tokenizer) and fast is not None:
        ids = [e.ids for e in fast(texts, add_special_tokens=False)]
    else:  # a pretrained family's transformers tokenizer
        ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum())), lengths


_WORKER_TOKENIZER = None


def _worker_init(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_WORKER_TOKENIZER, texts)


BATCH_CHARS = 4 << 20  # characters per tokenizer call: enough documents for its threads, a bounded size


def _batches(docs, route):
    """(split, [texts]) groups of about BATCH_CHARS characters, in corpus order per split."""
    pending: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for key, text, given in docs:
        split = route(key, given)
        if split is None:
            continue
        pending.setdefault(split, []).append(text)
        sizes[split] = sizes.get(split, 0) + len(text)
        if sizes[split] >= BATCH_CHARS:
            yield split, pending.pop(split)
            sizes[split] = 0
    yield from pending.items()


def _encoded(batches, tokenizer: Tokenizer, num_proc: int):
    """(split, n_chars, flat ids, lengths) of each batch, in order; `num_proc` > 1 encodes in that
    many processes with at most two batches each in flight."""
    if num_proc <= 1:
        for split, texts in batches:
            yield (split, sum(map(len, texts)), *_encode(tokenizer, texts))
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # tokenizers' threads do not survive a fork
    with ProcessPoolExecutor(num_proc, context, initializer=_worker_init, initargs=(tokenizer,)) as pool:
        window: deque = deque()
        for split, texts in batches:
            window.append((split, sum(map(len, texts)), pool.submit(_worker_encode, texts)))
            if len(window) >= 2 * num_proc:
                split_, n, future = window.popleft()
                yield (split_, n, *future.result())
        while window:
            split_, n, future = window.popleft()
            yield (split_, n, *future.result())


def tokenize_corpus(
    cfg: DataConfig, tokenizer: Tokenizer, survey: Survey, splits: tuple[str, ...], *, verbose: bool = False
) -> dict[str, TokenShards]:
    """The splits' token shards: opened from the cache, or written in one streamed pass over the
    corpus (keyed by the corpus's settings and content, the tokenizer and the split)."""
    folders = {}
    for split in splits:
        key = f"{corpus_key(cfg)}|{split}|{tokenizer.fingerprint}|{survey.digest}"
        folders[split] = cfg.cache_path / "shards" / hashlib.sha256(key.encode()).hexdigest()[:20]
    missing = [s for s in splits if not (folders[s].is_dir() and TokenShards.complete(folders[s]))]
    if missing:
        from tqdm import tqdm

        writers = {s: ShardWriter(folders[s], tokenizer.vocab_size) for s in missing}

        def route(key: str, given: str | None) -> str | None:
            split = survey.split_of(key, given, cfg.valid_fraction, cfg.test_fraction)
            return split if split in writers else None

        bar = tqdm(total=survey.chars, unit="char", unit_scale=True, desc=f"tokenizing {', '.join(missing)}",
                   disable=not verbose, file=sys.stderr, mininterval=2)  # fmt: skip
        n_tokens, t0 = 0, time.perf_counter()
        try:
            with bar:
                for split, n_chars, flat, lengths in _encoded(
                    _batches(_documents(cfg), route), tokenizer, cfg.num_proc
                ):
                    writers[split].add(np.split(flat, np.cumsum(lengths)[:-1]))
                    n_tokens += len(flat)
                    bar.update(n_chars)
                    bar.set_postfix_str(
                        f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False
                    )
                bar.update(survey.chars - bar.n)  # documents of splits not asked for were skipped
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        for w in writers.values():
            w.close()
    return {s: TokenShards.open(folders[s]) for s in splits}


def tokenize_split(docs: list[str], tokenizer: Tokenizer, cache_dir: Path, key: str) -> TokenShards:
    """In-memory documents tokenized once into shards; later calls with the same key, tokenizer and
    document contents open the cached shards."""
    digest = hashlib.sha256(f"{key}|{tokenizer.fingerprint}|{docs_digest(docs)}".encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "shards" / digest
    if folder.is_dir() and TokenShards.complete(folder):
        return TokenShards.open(folder)
    writer = ShardWriter(folder, tokenizer.vocab_size)
    flat, lengths = (
        _encode(tokenizer, list(docs)) if docs else (np.zeros(0, np.uint32), np.zeros(0, np.int64))
    )
    writer.add(np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else [])
    return writer.close()


def docs_digest(docs: list[str]) -> str:
    """The documents' content: a cache keyed by it misses when a file is edited in place."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:20]
