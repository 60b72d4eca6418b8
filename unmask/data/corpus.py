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

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmask.config import DataConfig
from unmask.data.sources import (  # noqa: F401 - re-exported: where callers have always found them
    CHUNK_CHARS,
    CHUNKS_PER_FILE,
    LOCAL_KINDS,
    SPLITS,
    DataError,
    _hf_documents,
    _local_documents,
    _read_text,
    load_hf_dataset,
    read_jsonl,
    stdlib_files,
    text_chunks,
)
from unmask.data.tokenizer import Tokenizer
from unmask.integrity import is_write_error, sha256, write_failed

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


def load_corpus(
    spec: str,
    *,
    txt_documents: str = "auto",
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    text_field: str = "text",
) -> dict[str, list[str]]:
    """Read a corpus and split it deterministically into train/validation/test documents: by a hash
    of each document's key, and where that leaves a held-out split empty of a corpus with at least
    three documents, the training document whose key hashes lowest moves there."""
    if spec == "stdlib" or spec.startswith("stdlib:"):
        modules = tuple(m for m in spec.removeprefix("stdlib").lstrip(":").split(",") if m)
        keyed = [(rel, _read_text(p)) for rel, p in stdlib_files(modules)]
    elif spec.startswith("synthetic:"):
        from unmask.data.synthetic import SyntheticError, documents

        try:
            keyed = documents(spec)
        except SyntheticError as e:
            raise DataError(str(e)) from e
    elif spec.startswith("hf:"):
        loaded = _hf_documents(spec, text_field)
        if isinstance(loaded, dict):
            return _checked(spec, loaded)
        keyed = loaded
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(
                f"corpus {spec!r}: no such file or directory (and not `stdlib` or `hf:ORG/NAME[:CONFIG]`)"
            )
        keyed = _local_documents(path, txt_documents, text_field)
    keyed_splits: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for key, text in keyed:
        if text.strip():
            keyed_splits[_split_of(key, valid_fraction, test_fraction)].append((key, text))
    for s in ("validation", "test"):
        if not keyed_splits[s] and len(keyed_splits["train"]) >= 2:
            train = keyed_splits["train"]
            keyed_splits[s].append(train.pop(min(range(len(train)), key=lambda i: _key_hash(train[i][0]))))
    return _checked(spec, {s: [text for _, text in docs] for s, docs in keyed_splits.items()})


def _checked(spec: str, splits: dict[str, list[str]]) -> dict[str, list[str]]:
    if not any(splits.values()):
        raise DataError(f"corpus {spec!r} has no non-empty documents")
    for s in SPLITS:
        if not splits[s]:
            raise DataError(
                f"corpus {spec!r}: the {s} split is empty ({sum(map(len, splits.values()))} "
                "documents in all, at least 3 are needed); give a bigger corpus, or split a "
                ".txt file into more documents (--data.txt_documents chunks or blank_lines)"
            )
    return splits


# ---------------------------------------------------------------------------------------------
# tokenized cache


@dataclass(frozen=True)
class TokenizedSplit:
    """A split as one flat token stream plus document boundaries (memory-mapped from the cache)."""

    tokens: np.ndarray  # [N_tokens] int32, documents concatenated without specials
    offsets: np.ndarray  # [N_docs + 1] int64, document d is tokens[offsets[d]:offsets[d+1]]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_write_error(e):
            raise write_failed(path, e, array.nbytes) from None
        raise


def _cache_ok(folder: Path, meta_file: Path) -> bool:
    """A cached entry whose arrays match the digests its meta.json recorded (older entries, written
    without digests, are trusted); a corrupt one is tokenized again."""
    try:
        digests = json.loads(meta_file.read_text()).get("sha256")
    except (OSError, json.JSONDecodeError):
        digests = {}
    if digests is None:
        return True
    if digests and all((folder / n).is_file() and sha256(folder / n) == d for n, d in digests.items()):
        return True
    print(f"token cache {folder} is corrupt; tokenizing again", file=sys.stderr)
    return False


def docs_digest(docs: list[str]) -> str:
    """The documents' content: a cache keyed by it misses when a file is edited in place."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def tokenize_split(docs: list[str], tokenizer: Tokenizer, cache_dir: Path, key: str) -> TokenizedSplit:
    """Tokenize documents once; later calls with the same key, tokenizer and document contents
    memory-map the cached arrays."""
    digest = hashlib.sha256(f"{key}|{tokenizer.fingerprint}|{docs_digest(docs)}".encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "tokens" / digest
    tok_file, off_file, meta_file = folder / "tokens.npy", folder / "offsets.npy", folder / "meta.json"
    if meta_file.is_file() and _cache_ok(folder, meta_file):
        return TokenizedSplit(np.load(tok_file, mmap_mode="r"), np.load(off_file))
    folder.mkdir(parents=True, exist_ok=True)
    ids = tokenizer.encode_batch(docs)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    tokens = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    _atomic_save(tok_file, tokens)
    _atomic_save(off_file, offsets)
    tmp = meta_file.with_name(f"meta.json.tmp{os.getpid()}")
    digests = {f.name: sha256(f) for f in (tok_file, off_file)}
    tmp.write_text(json.dumps({"key": key, "n_docs": len(docs), "sha256": digests}))
    os.replace(tmp, meta_file)  # written last: its presence means the cache entry is complete
    return TokenizedSplit(np.load(tok_file, mmap_mode="r"), offsets)


# ---------------------------------------------------------------------------------------------
# packing


def pack_rows(
    split: TokenizedSplit, seq_len: int, packing: str, tokenizer: Tokenizer, name: str = "split"
) -> np.ndarray:
    """Rows `[N, L]` (int64) packed in `wrap` or `pad` mode; `name` names the split in errors."""
    bos, eos, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    if bos is None:  # tokenizers without BOS (SDAR, Fast-dLLM v2): documents start after an [EOS]
        bos = eos
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
    corpus, _, split = spec.partition("@")
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
    rows: dict[str, np.ndarray]  # split -> [N, L] int64
    spans: dict[str, np.ndarray] | None = None  # instruction rows: split -> [N, 2] (response start, [EOS])


def corpus_key(cfg: DataConfig) -> str:
    return f"{cfg.corpus}|{cfg.txt_documents}|{cfg.valid_fraction}|{cfg.test_fraction}|{cfg.text_field}"


def build_tokenizer(cfg: DataConfig, train_docs: list[str]) -> Tokenizer:
    """Load the configured HF tokenizer, or train (and cache) a BPE on the training documents."""
    if cfg.tokenizer != "bpe":
        return Tokenizer.load(cfg.tokenizer)
    key = hashlib.sha256(
        f"{corpus_key(cfg)}|{cfg.vocab_size}|{docs_digest(train_docs)}".encode()
    ).hexdigest()[:20]
    path = cfg.cache_path / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        return Tokenizer.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train_bpe(train_docs, cfg.vocab_size)
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
    """Corpus -> tokenizer (given, loaded or trained) -> cached token streams -> packed rows."""
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    t0 = time.perf_counter()
    docs = load_corpus(
        cfg.corpus,
        txt_documents=cfg.txt_documents,
        valid_fraction=cfg.valid_fraction,
        test_fraction=cfg.test_fraction,
        text_field=cfg.text_field,
    )
    say(
        f"corpus {cfg.corpus}: "
        + ", ".join(f"{len(docs[s])} {s} documents" for s in SPLITS)
        + f" ({time.perf_counter() - t0:.1f}s)"
    )
    if tokenizer is None:
        t0 = time.perf_counter()
        tokenizer = build_tokenizer(cfg, docs["train"])
        say(
            f"tokenizer: {cfg.tokenizer} with {tokenizer.vocab_size} ids ({time.perf_counter() - t0:.1f}s,"
            f" cached under {cfg.cache_path})"
        )
        if cfg.tokenizer == "bpe" and tokenizer.vocab_size < cfg.vocab_size:
            print(
                f"note: the BPE vocabulary has {tokenizer.vocab_size} ids, fewer than the "
                f"--data.vocab_size {cfg.vocab_size} asked for: the training split "
                f"({sum(map(len, docs['train'])):,} characters) has no more merges to learn",
                file=sys.stderr,
            )
    rows = {}
    for split in splits:
        t0 = time.perf_counter()
        tokens = tokenize_split(docs[split], tokenizer, cfg.cache_path, f"{corpus_key(cfg)}|{split}")
        rows[split] = pack_rows(tokens, cfg.seq_len, cfg.packing, tokenizer, name=split)
        say(
            f"{split}: {len(tokens.tokens):,} tokens -> {len(rows[split]):,} rows of {cfg.seq_len} "
            f"({cfg.packing}, {time.perf_counter() - t0:.1f}s)"
        )
    return PreparedData(tokenizer, rows)
