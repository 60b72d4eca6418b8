"""Corpora split into train / validation / test, packed into fixed-length rows: `prepare_data`, the
three streamed passes (`unmask.data.survey`, the BPE here, `unmask.data.tokenize`) and the rows.

Corpora (read by `unmask.data.sources`): `stdlib` (the embedded default), local `.txt` / `.jsonl`
(also gzipped) / `.parquet` / `.arrow` files or directories of them, `hf:ORG/NAME[:CONFIG]` or
`hf:DIR`, and `synthetic:NAME[,key=value...]` (known-answer tasks, `unmask.data.synthetic`).

Every document gets a stable key (relative path, line number, ...); the train/validation/test
split is decided by a hash of that key, so it never depends on file order or on other documents.
Packing follows BD3-LM: `wrap` joins `[BOS] doc [EOS]` and cuts exact `L`-token rows; `pad` puts
one document per row, truncated or padded with `[PAD]` (which carries no loss).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from unmask.config import DataConfig
from unmask.data.shards import PadRows, TokenShards, WrapRows
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
from unmask.data.survey import (  # noqa: F401 - re-exported
    Survey,
    _documents,
    _key_hash,
    _split_of,
    corpus_key,
    survey_corpus,
)
from unmask.data.tokenize import docs_digest, tokenize_corpus, tokenize_split  # noqa: F401 - re-exported
from unmask.data.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# corpora -> {split: [documents]}


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
