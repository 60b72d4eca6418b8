"""Reading corpora: the documents of every source kind, each with a stable key.

- `stdlib`: the `.py` sources of the running interpreter's standard library (`stdlib:json,email`
  keeps those top-level modules);
- local files: `.txt` (one document per file, per blank-line paragraph, or per run of paragraphs),
  `.jsonl` (a text field per line), both also gzipped, `.parquet` / `.arrow` (a text column), or a
  directory of those;
- `hf:ORG/NAME[:CONFIG][@SPLIT]` (a Hugging Face dataset, streamed with `--data.streaming`) or
  `hf:DIR` (a `save_to_disk` folder, or a folder of parquet / json data files).

Every reader is a generator: a corpus is read a document at a time, never held whole.

`unmask.data.corpus` splits the documents, tokenizes and packs them.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SPLITS = ("train", "validation", "test")
Doc = tuple[str, str, "str | None"]  # (key, text, the split a dataset gave it)


class DataError(ValueError):
    """A corpus could not be read or is unusable; the message names the corpus or file."""


CHUNK_CHARS = 4096  # least characters per document of `chunks` (about 1,000 tokens of English)
CHUNKS_PER_FILE = 200  # ... and a long file gives about this many


def stdlib_files(modules: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files, tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = rel.parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if any(p in ("test", "tests", "idle_test") or p.startswith("test_") for p in parts):
            continue
        if modules and parts[0].removesuffix(".py") not in modules:
            continue
        out.append((rel.as_posix(), path))
    found = {rel.split("/")[0].removesuffix(".py") for rel, _ in out}
    unknown = sorted(set(modules) - found)
    if unknown:
        raise DataError(
            f"corpus stdlib:{','.join(modules)}: no standard-library module or package named "
            f"{', '.join(unknown)} (with .py sources, tests excluded) in {root}"
        )
    return out


def _read_text(path: Path) -> str:
    """A text file's contents; `.gz` files are decompressed."""
    try:
        if path.suffix == ".gz":
            import gzip

            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    except (OSError, EOFError) as e:  # gzip: not a gzip file, truncated
        raise DataError(f"cannot read {path}: {e}") from e


LOCAL_KINDS = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".parquet", ".arrow")


def _kind(path: Path) -> str:
    """`.txt`, `.jsonl` (also gzipped), `.parquet`, `.arrow`, or "" for other files."""
    name = path.name.lower()
    return next((k.removesuffix(".gz") for k in LOCAL_KINDS if name.endswith(k)), "")


def _open_text(path: Path):
    """A text file opened for streaming reads; `.gz` files are decompressed."""
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _table_texts(path: Path, field: str) -> Iterator[str]:
    """The `field` column of a parquet or arrow file (pyarrow, installed with `datasets`), read a
    record batch at a time."""
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise DataError(
            f"corpus {path}: reading {path.suffix} needs pyarrow: pip install 'unmask[hf]'"
        ) from e
    try:
        if path.suffix == ".parquet":
            reader = pyarrow.parquet.ParquetFile(path)
            columns = reader.schema_arrow.names
            batches = lambda: reader.iter_batches(columns=[field], batch_size=4096)  # noqa: E731
        else:
            source = pyarrow.memory_map(str(path))
            try:
                table = pyarrow.ipc.open_file(source).read_all()
            except pyarrow.ArrowInvalid:
                table = pyarrow.ipc.open_stream(source).read_all()
            columns = table.column_names
            batches = lambda: table.select([field]).to_batches(4096)  # noqa: E731
    except (OSError, pyarrow.ArrowInvalid) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if field not in columns:
        raise DataError(
            f"{path} has no column {field!r} (columns: {', '.join(columns)}); pass --data.text_field NAME"
        )
    for batch in batches():
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def iter_jsonl(path: Path, field: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line of a JSONL file, read line by line; each record
    must be an object with a string `field`. Errors name the file and line."""
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON: {e.msg}") from e
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise DataError(f"{path}:{n}: expected an object with a string `{field}` field")
                yield n, record
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def read_jsonl(path: Path, field: str) -> list[tuple[int, dict]]:
    return list(iter_jsonl(path, field))


def text_chunks(text: str, min_chars: int) -> list[str]:
    """Consecutive runs of paragraphs (or lines, when the text has no blank lines) of at least
    `min_chars` characters; the last run takes the remainder."""
    parts = [p for p in text.split("\n\n") if p.strip()]
    sep = "\n\n"
    if len(parts) <= 1:
        parts, sep = [p for p in text.splitlines() if p.strip()], "\n"
    chunks, current, size = [], [], 0
    for p in parts:
        current.append(p)
        size += len(p) + len(sep)
        if size >= min_chars:
            chunks.append(sep.join(current))
            current, size = [], 0
    if current:
        if chunks and size < min_chars // 2:
            chunks[-1] += sep + sep.join(current)
        else:
            chunks.append(sep.join(current))
    return chunks


STREAM_BYTES = 64 << 20  # .txt files above this are read as a stream ...
STREAM_CHUNK_CHARS = 1 << 18  # ... in runs of at most 256 Ki characters (many documents per batch)


def _paragraphs(f, block: int = 1 << 20) -> Iterator[str]:
    """`text.split("\n\n")` of a file, read a block at a time."""
    rest = ""
    while piece := f.read(block):
        parts = (rest + piece).split("\n\n")
        rest = parts.pop()
        yield from parts
    yield rest


def _streamed_chunks(path: Path, min_chars: int) -> Iterator[str]:
    """`text_chunks` of a file too big to read whole: runs of paragraphs of at least `min_chars`
    characters; a paragraph longer than four runs is cut at line breaks."""
    held, current, size = None, [], 0
    with _open_text(path) as f:
        for paragraph in _paragraphs(f):
            if not paragraph.strip():
                continue
            pieces = text_chunks(paragraph, min_chars) if len(paragraph) > 4 * min_chars else [paragraph]
            for p in pieces:
                current.append(p)
                size += len(p) + 2
                if size >= min_chars:
                    if held is not None:
                        yield held
                    held, current, size = "\n\n".join(current), [], 0
    if current:
        if held is not None and size < min_chars // 2:
            held += "\n\n" + "\n\n".join(current)
        else:
            if held is not None:
                yield held
            held = "\n\n".join(current)
    if held is not None:
        yield held


def _txt_documents(path: Path, rel: str, txt_documents: str) -> Iterator[tuple[str, str]]:
    if txt_documents == "file":
        yield rel, _read_text(path)
        return
    nbytes = path.stat().st_size
    try:
        if txt_documents == "chunks" and nbytes > STREAM_BYTES:
            size = min(max(CHUNK_CHARS, nbytes // CHUNKS_PER_FILE), STREAM_CHUNK_CHARS)
            yield from ((f"{rel}@{i}", c) for i, c in enumerate(_streamed_chunks(path, size)))
        elif txt_documents == "chunks":
            text = _read_text(path)
            # about 200 chunks of a long file, >= 4096 characters each, but always three for the splits
            size = min(max(CHUNK_CHARS, len(text) // CHUNKS_PER_FILE), len(text) // 3)
            yield from ((f"{rel}@{i}", c) for i, c in enumerate(text_chunks(text, max(size, 1))))
        else:
            with _open_text(path) as f:
                paragraphs = (p for p in _paragraphs(f) if p.strip())
                yield from ((f"{rel}#{i}", p) for i, p in enumerate(paragraphs))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def local_files(root: Path) -> list[Path]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if _kind(p) and p.is_file())
    if not files:
        raise DataError(f"corpus {root}: no {', '.join(LOCAL_KINDS)} files found")
    return files


def local_documents(root: Path, txt_documents: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(key, text) of every document under a local file or directory, read file by file (a big .txt
    or .jsonl as a stream)."""
    files = local_files(root)
    if txt_documents == "auto":
        txt_documents = "chunks" if root.is_file() else "file"
    for path in files:
        rel = path.name if path == root else path.relative_to(root).as_posix()
        kind = _kind(path)
        if kind == ".jsonl":
            yield from ((f"{rel}:{n}", record[text_field]) for n, record in iter_jsonl(path, text_field))
        elif kind in (".parquet", ".arrow"):
            yield from ((f"{rel}:{n}", t) for n, t in enumerate(_table_texts(path, text_field)))
        elif kind == ".txt":
            yield from _txt_documents(path, rel, txt_documents)
        else:
            raise DataError(f"corpus {path}: unsupported file type (use one of {', '.join(LOCAL_KINDS)})")


def load_hf_dataset(spec: str, flag: str = "corpus", *, streaming: bool = False) -> dict:
    """`hf:ORG/NAME[:CONFIG][@SPLIT]` or `hf:DIR` through the optional `datasets` package: {split:
    dataset} (only SPLIT when given). DIR is a `save_to_disk` folder or a folder of data files
    (parquet, json, ...). `streaming` reads Hub datasets and data-file folders without downloading
    or converting them whole. Errors name `flag` and the spec."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{flag} {spec!r} needs the optional `datasets` package: pip install 'unmask[hf]'"
        ) from e
    body = spec.removeprefix("hf:")
    body, _, split = body.rpartition("@") if "@" in body else (body, "", "")
    name, _, config = body.partition(":")  # ORG/NAME[:CONFIG]: `/` is in names
    if not name:
        raise DataError(f"{flag} {spec!r}: expected hf:ORG/NAME[:CONFIG][@SPLIT] or hf:LOCAL_DATASET_DIR")
    folder = Path(name).expanduser()
    try:
        if folder.is_dir() and any((folder / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(folder))  # written by save_to_disk (memory-mapped)
            loaded = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        else:
            where = str(folder) if folder.is_dir() else name
            loaded = dict(datasets.load_dataset(where, config or None, streaming=streaming))
    except Exception as e:  # offline, unknown name, ...: datasets raises many kinds
        raise DataError(
            f"{flag} {spec!r}: could not load the Hugging Face dataset "
            f"(offline or unknown name?): {type(e).__name__}: {e}"
        ) from e
    if split:
        if split not in loaded:
            raise DataError(f"{flag} {spec!r}: no split {split!r} (splits: {', '.join(loaded)})")
        loaded = {split: loaded[split]}
    if not loaded:
        raise DataError(f"{flag} {spec!r}: the dataset has no splits")
    return loaded


def _columns(ds) -> list[str]:
    names = ds.column_names
    if names is None:  # a streamed dataset whose features are unknown until read
        names = list(next(iter(ds)).keys())
    return list(names)


def hf_documents(spec: str, text_field: str = "text", *, streaming: bool = False) -> Iterator[Doc]:
    """(key, text, split) of a Hugging Face dataset's documents, read row by row: split is the
    dataset's own when it has train, validation and test (else None: unmask splits by key)."""
    ds = load_hf_dataset(spec, streaming=streaming)
    columns = _columns(next(iter(ds.values())))
    if text_field not in columns:
        raise DataError(
            f"corpus {spec!r} has no column {text_field!r} (columns: {', '.join(columns)}); "
            "pass --data.text_field NAME"
        )
    if all(s in ds for s in SPLITS):
        for s in SPLITS:
            yield from (
                (f"{s}:{i}", r[text_field], s) for i, r in enumerate(ds[s].select_columns([text_field]))
            )
        return
    first = next(iter(ds.values())).select_columns([text_field])
    yield from ((f"{i}", r[text_field], None) for i, r in enumerate(first))


def iter_documents(
    spec: str, *, txt_documents: str = "auto", text_field: str = "text", streaming: bool = False
) -> Iterator[Doc]:
    """(key, text, split or None) of every document of a corpus spec, read as a stream (the
    documents of one file at a time at most)."""
    if spec == "stdlib" or spec.startswith("stdlib:"):
        modules = tuple(m for m in spec.removeprefix("stdlib").lstrip(":").split(",") if m)
        yield from ((rel, _read_text(p), None) for rel, p in stdlib_files(modules))
    elif spec.startswith("synthetic:"):
        from unmask.data.synthetic import SyntheticError, documents

        try:
            keyed = documents(spec)
        except SyntheticError as e:
            raise DataError(str(e)) from e
        yield from ((k, t, None) for k, t in keyed)
    elif spec.startswith("hf:"):
        yield from hf_documents(spec, text_field, streaming=streaming)
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(
                f"corpus {spec!r}: no such file or directory (and not `stdlib` or "
                "`hf:ORG/NAME[:CONFIG][@SPLIT]`)"
            )
        yield from ((k, t, None) for k, t in local_documents(path, txt_documents, text_field))


def source_files(spec: str) -> list[Path] | None:
    """The local files a corpus is read from (None: not only local files, e.g. a Hub dataset)."""
    if spec == "stdlib" or spec.startswith("stdlib:"):
        modules = tuple(m for m in spec.removeprefix("stdlib").lstrip(":").split(",") if m)
        return [p for _, p in stdlib_files(modules)]
    if spec.startswith(("synthetic:", "hf:")):
        return None
    return local_files(Path(spec)) if Path(spec).exists() else None
