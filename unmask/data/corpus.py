"""Corpora split into train / validation / test, tokenized caches, and packing into fixed-length rows.

Corpora (read by `unmask.data.sources`): `stdlib` (the embedded default), local `.txt` / `.jsonl`
(also gzipped) / `.parquet` / `.arrow` files or directories of them, `hf:ORG/NAME[:CONFIG]` or
`hf:DIR`, and `synthetic:NAME[,key=value...]` (known-answer tasks, `unmask.data.synthetic`).

Every document gets a stable key (relative path, line number, ...); the train/validation/test
split is decided by a hash of that key, so it never depends on file order or on other documents.
Packing follows BD3-LM: `wrap` joins `[BOS] doc [EOS]` and cuts exact `L`-token rows; `pad` puts
one document per row, truncated or padded with `[PAD]` (which carries no loss).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmask.config import DataConfig
from unmask.data.shards import PadRows, ShardWriter, TokenShards, WrapRows
from unmask.data.sources import (  # noqa: F401 - re-exported: where callers have always found them
    CHUNK_CHARS,
    CHUNKS_PER_FILE,
    LOCAL_KINDS,
    SPLITS,
    DataError,
    _read_text,
    iter_documents,
    load_hf_dataset,
    read_jsonl,
    source_files,
    stdlib_files,
    text_chunks,
)
from unmask.data.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# corpora -> {split: [documents]}


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


def load_corpus(
    spec: str,
    *,
    txt_documents: str = "auto",
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    text_field: str = "text",
) -> dict[str, list[str]]:
    """A corpus's documents in memory, split into train / validation / test as `prepare_data`
    splits them (for prompts, reference texts and tests; training streams instead)."""
    cfg = DataConfig(corpus=spec, txt_documents=txt_documents, valid_fraction=valid_fraction,
                     test_fraction=test_fraction, text_field=text_field)  # fmt: skip
    survey = survey_corpus(cfg)
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key, text, given in _documents(cfg):
        splits[survey.split_of(key, given, valid_fraction, test_fraction)].append(text)
    return splits


# ---------------------------------------------------------------------------------------------
# token shards


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


# ---------------------------------------------------------------------------------------------
# packing


def _specials(tokenizer: Tokenizer) -> tuple[int, int, int]:
    bos, eos, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    if bos is None:  # tokenizers without BOS (SDAR, Fast-dLLM v2): documents start after an [EOS]
        bos = eos
    return bos, eos, pad


def packed_rows(
    shards: TokenShards, seq_len: int, packing: str, tokenizer: Tokenizer, name: str = "split"
) -> WrapRows | PadRows:
    """Rows `[N, L]` (int64) of the `wrap` or `pad` packing, read from the shards when indexed;
    `name` names the split in errors."""
    bos, eos, pad = _specials(tokenizer)
    if packing == "wrap":
        rows = WrapRows(shards, seq_len, bos, eos)
        if len(rows) == 0:
            raise DataError(
                f"the {name} split has {len(shards) + 2 * shards.n_docs} tokens ({shards.n_docs} documents "
                f"with their [BOS]/[EOS]), fewer than one row of --data.seq_len {seq_len}; lower "
                f"--data.seq_len, raise --data.valid_fraction / --data.test_fraction, or "
                f"give a bigger corpus"
            )
        return rows
    if packing == "pad":
        return PadRows(shards, seq_len, bos, eos, pad)
    raise DataError(f"unknown packing {packing!r} (use wrap or pad)")


def pack_rows(
    split: TokenShards, seq_len: int, packing: str, tokenizer: Tokenizer, name: str = "split"
) -> np.ndarray:
    """Rows `[N, L]` (int64) of a split in memory, built directly: the reference `packed_rows`'
    views are tested against."""
    bos, eos, pad = _specials(tokenizer)
    n_docs = len(split.offsets) - 1
    if packing == "wrap":
        # [BOS] doc [EOS] for every document, concatenated; the tail shorter than L is dropped.
        lengths = np.diff(split.offsets) + 2
        stream = np.empty(int(lengths.sum()), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        stream[starts] = bos
        stream[starts + lengths - 1] = eos
        body = np.ones(len(stream), dtype=bool)
        body[starts] = False
        body[starts + lengths - 1] = False
        stream[body] = split.tokens
        n_rows = len(stream) // seq_len
        if n_rows == 0:
            raise DataError(
                f"the {name} split has {len(stream)} tokens ({n_docs} documents with their "
                f"[BOS]/[EOS]), fewer than one row of --data.seq_len {seq_len}; lower "
                f"--data.seq_len, raise --data.valid_fraction / --data.test_fraction, or "
                f"give a bigger corpus"
            )
        return stream[: n_rows * seq_len].reshape(n_rows, seq_len)
    if packing == "pad":
        rows = np.full((n_docs, seq_len), pad, dtype=np.int64)
        for d in range(n_docs):
            doc = np.concatenate([[bos], split.tokens[split.offsets[d] : split.offsets[d + 1]], [eos]])
            rows[d, : min(len(doc), seq_len)] = doc[:seq_len]
        return rows
    raise DataError(f"unknown packing {packing!r} (use wrap or pad)")


def batch_indices(n_rows: int, batch_size: int, index: int, seed: int) -> np.ndarray:
    """Row indices of the `index`-th batch of a seeded, epoch-wise shuffled stream.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    """
    g = index * batch_size + np.arange(batch_size)
    epochs, pos = g // n_rows, g % n_rows
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n_rows)
        sel = epochs == epoch
        out[sel] = perm[pos[sel]]
    return out


def text_pieces(spec: str, n: int, chars: int, data: DataConfig | None = None) -> list[str]:
    """Up to n held-out texts of `chars` characters, consecutive pieces of the documents of
    `CORPUS@SPLIT` (e.g. `stdlib@test`, split as `data` splits it) or of a local file/directory
    (all its documents)."""
    corpus, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "")
    data = data or DataConfig()
    docs = (
        load_corpus(
            corpus,
            txt_documents=data.txt_documents,
            valid_fraction=data.valid_fraction,
            test_fraction=data.test_fraction,
        )
        if split
        else None
    )
    if split:
        if split not in docs:
            raise DataError(f"{spec}: unknown split {split!r} (use train, validation or test)")
        texts = docs[split]
    else:
        texts = [
            t for part in load_corpus(corpus, valid_fraction=0.01, test_fraction=0.01).values() for t in part
        ]
    pieces = [t[i : i + chars] for t in texts for i in range(0, len(t) - chars + 1, chars)]
    return [p for p in pieces if p.strip()][:n]


# ---------------------------------------------------------------------------------------------
# everything a run needs, from a DataConfig


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    rows: dict[str, np.ndarray | WrapRows | PadRows]  # split -> [N, L] int64, indexable
    spans: dict[str, np.ndarray] | None = None  # instruction rows: split -> [N, 2] (response start, [EOS])


def corpus_key(cfg: DataConfig) -> str:
    return f"{cfg.corpus}|{cfg.txt_documents}|{cfg.valid_fraction}|{cfg.test_fraction}|{cfg.text_field}"


def build_tokenizer(cfg: DataConfig, survey: Survey) -> Tokenizer:
    """Load the configured HF tokenizer, or train (and cache) a BPE on the training documents
    (streamed to the trainer)."""
    if cfg.tokenizer != "bpe":
        return Tokenizer.load(cfg.tokenizer)
    share = min(1.0, cfg.bpe_chars / max(survey.chars, 1))  # of every document: whole corpora up to bpe_chars
    key = f"{corpus_key(cfg)}|{cfg.vocab_size}|{survey.digest}" + (f"|{share}" if share < 1 else "")
    key = hashlib.sha256(key.encode()).hexdigest()[:20]
    path = cfg.cache_path / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        return Tokenizer.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train = (t for k, t, given in _documents(cfg)
             if survey.split_of(k, given, cfg.valid_fraction, cfg.test_fraction) == "train"
             and (share == 1 or _key_hash(f"bpe|{k}") < share))  # fmt: skip
    tok = Tokenizer.train_bpe(train, cfg.vocab_size)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def prepare_data(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    splits: tuple[str, ...] = SPLITS,
    *,
    verbose: bool = False,
) -> PreparedData:
    """Corpus -> tokenizer (given, loaded or trained) -> token shards (cached) -> rows read from
    them. The corpus is streamed in every pass: memory does not grow with it."""
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    t0 = time.perf_counter()
    survey = survey_corpus(cfg, memo=cfg.cache_path / "surveys")
    say(
        f"corpus {cfg.corpus}: "
        + ", ".join(f"{survey.docs[s]} {s} documents" for s in SPLITS)
        + f", {survey.chars:,} characters ({time.perf_counter() - t0:.1f}s)"
    )
    if tokenizer is None:
        t0 = time.perf_counter()
        tokenizer = build_tokenizer(cfg, survey)
        say(
            f"tokenizer: {cfg.tokenizer} with {tokenizer.vocab_size} ids ({time.perf_counter() - t0:.1f}s,"
            f" cached under {cfg.cache_path})"
        )
        if cfg.tokenizer == "bpe" and tokenizer.vocab_size < cfg.vocab_size:
            print(
                f"note: the BPE vocabulary has {tokenizer.vocab_size} ids, fewer than the "
                f"--data.vocab_size {cfg.vocab_size} asked for: the training split "
                "has no more merges to learn",
                file=sys.stderr,
            )
    t0 = time.perf_counter()
    shards = tokenize_corpus(cfg, tokenizer, survey, splits, verbose=verbose)
    rows = {}
    for split in splits:
        rows[split] = packed_rows(shards[split], cfg.seq_len, cfg.packing, tokenizer, name=split)
        say(
            f"{split}: {len(shards[split]):,} tokens -> {len(rows[split]):,} rows of {cfg.seq_len} "
            f"({cfg.packing}, {shards[split].maps[0].dtype if shards[split].maps else 'no'} shards, "
            f"{time.perf_counter() - t0:.1f}s)"
        )
    return PreparedData(tokenizer, rows)
