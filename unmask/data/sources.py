"""Reading corpora: the documents of every source kind, each with a stable key.

- `stdlib`: the `.py` sources of the running interpreter's standard library (`stdlib:json,email`
  keeps those top-level modules);
- local files: `.txt` (one document per file, per blank-line paragraph, or per run of paragraphs),
  `.jsonl` (a text field per line), both also gzipped, `.parquet` / `.arrow` (a text column), or a
  directory of those;
- `hf:ORG/NAME[:CONFIG]` (a Hugging Face dataset) or `hf:DIR` (a `save_to_disk` folder).

`unmask.data.corpus` splits the documents, tokenizes and packs them.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

SPLITS = ("train", "validation", "test")


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


def _table_texts(path: Path, field: str) -> list[str]:
    """The `field` column of a parquet or arrow file (pyarrow, installed with `datasets`)."""
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise DataError(
            f"corpus {path}: reading {path.suffix} needs pyarrow: pip install 'unmask[hf]'"
        ) from e
    try:
        if path.suffix == ".parquet":
            table = pyarrow.parquet.read_table(path)
        else:
            with pyarrow.memory_map(str(path)) as source:
                try:
                    table = pyarrow.ipc.open_file(source).read_all()
                except pyarrow.ArrowInvalid:
                    table = pyarrow.ipc.open_stream(source).read_all()
    except (OSError, pyarrow.ArrowInvalid) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if field not in table.column_names:
        raise DataError(
            f"{path} has no column {field!r} (columns: {', '.join(table.column_names)}); "
            "pass --data.text_field NAME"
        )
    return [t for t in table.column(field).to_pylist() if isinstance(t, str)]


def read_jsonl(path: Path, field: str) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line of a JSONL file; each record must be an
    object with a string `field`. Errors name the file and line."""
    out = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON: {e.msg}") from e
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{n}: expected an object with a string `{field}` field")
        out.append((n, record))
    return out


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


def _local_documents(root: Path, txt_documents: str, text_field: str = "text") -> list[tuple[str, str]]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if _kind(p) and p.is_file())
    if not files:
        raise DataError(f"corpus {root}: no {', '.join(LOCAL_KINDS)} files found")
    if txt_documents == "auto":
        txt_documents = "chunks" if root.is_file() else "file"
    docs = []
    for path in files:
        rel = path.name if path == root else path.relative_to(root).as_posix()
        kind = _kind(path)
        if kind == ".jsonl":
            docs.extend((f"{rel}:{n}", record[text_field]) for n, record in read_jsonl(path, text_field))
        elif kind in (".parquet", ".arrow"):
            docs.extend((f"{rel}:{n}", t) for n, t in enumerate(_table_texts(path, text_field)))
        elif kind == ".txt":
            text = _read_text(path)
            if txt_documents == "file":
                docs.append((rel, text))
            elif txt_documents == "chunks":
                # about 200 chunks of a long file, >= 4096 characters each, but always three for the splits
                size = min(max(CHUNK_CHARS, len(text) // CHUNKS_PER_FILE), len(text) // 3)
                chunks = text_chunks(text, max(size, 1))
                docs.extend((f"{rel}@{i}", c) for i, c in enumerate(chunks))
            else:
                paragraphs = [p for p in text.split("\n\n") if p.strip()]
                docs.extend((f"{rel}#{i}", p) for i, p in enumerate(paragraphs))
        else:
            raise DataError(f"corpus {path}: unsupported file type (use one of {', '.join(LOCAL_KINDS)})")
    return docs


def load_hf_dataset(spec: str, flag: str = "corpus"):
    """`hf:ORG/NAME[:CONFIG]` through the optional `datasets` package; errors name `flag` and spec."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{flag} {spec!r} needs the optional `datasets` package: pip install 'unmask[hf]'"
        ) from e
    name, _, config = spec.removeprefix("hf:").partition(":")  # ORG/NAME[:CONFIG]: `/` is in names
    if not name:
        raise DataError(f"{flag} {spec!r}: expected hf:ORG/NAME[:CONFIG] or hf:LOCAL_DATASET_DIR")
    try:
        if Path(name).expanduser().is_dir():  # a dataset folder written by save_to_disk
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        return datasets.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown name, ...: datasets raises many kinds
        raise DataError(
            f"{flag} {spec!r}: could not load the Hugging Face dataset "
            f"(offline or unknown name?): {type(e).__name__}: {e}"
        ) from e


def _hf_documents(spec: str, text_field: str = "text") -> dict[str, list[str]] | list[tuple[str, str]]:
    ds = load_hf_dataset(spec)
    first = next(iter(ds.values()))
    if text_field not in first.column_names:
        raise DataError(
            f"corpus {spec!r} has no column {text_field!r} (columns: {', '.join(first.column_names)}); "
            "pass --data.text_field NAME"
        )
    if all(s in ds for s in SPLITS):
        return {s: [t for t in ds[s][text_field] if t.strip()] for s in SPLITS}
    return [(f"{i}", t) for i, t in enumerate(first[text_field]) if t.strip()]
