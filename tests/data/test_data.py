import json

import numpy as np
import pytest

from unmask.data.corpus import (
    DataError,
    batch_indices,
    load_corpus,
    pack_rows,
    stdlib_files,
    tokenize_split,
)


def test_stdlib_corpus_excludes_tests_and_is_deterministic():
    files = [rel for rel, _ in stdlib_files()]
    assert files == sorted(files) and len(files) > 100
    assert not any("/test" in f or f.startswith("test") or "site-packages" in f for f in files)
    a = load_corpus("stdlib")
    b = load_corpus("stdlib")
    assert a == b and len(files) - 10 < sum(map(len, a.values())) <= len(files)  # empty files dropped
    assert 0.9 < len(a["train"]) / len(files) < 0.995


def test_split_is_by_stable_hash_of_the_document_key(tmp_path):
    for i in range(200):
        (tmp_path / f"doc{i:03d}.txt").write_text(f"document number {i}\n")
    full = load_corpus(str(tmp_path), valid_fraction=0.2, test_fraction=0.2)
    (tmp_path / "doc000.txt").unlink()  # removing one document never moves another
    fewer = load_corpus(str(tmp_path), valid_fraction=0.2, test_fraction=0.2)
    for s in ("validation", "test"):
        assert set(fewer[s]) <= set(full[s])
    assert 0.1 < len(full["test"]) / 200 < 0.3


def test_txt_blank_line_documents_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"para {i}" for i in range(300)))
    paras = load_corpus(
        str(tmp_path / "a.txt"), txt_documents="blank_lines", valid_fraction=0.2, test_fraction=0.2
    )
    assert sum(len(v) for v in paras.values()) == 300
    lines = [json.dumps({"text": f"row {i}"}) for i in range(300)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    rows = load_corpus(str(tmp_path / "b.jsonl"), valid_fraction=0.2, test_fraction=0.2)
    assert sorted(sum(rows.values(), [])) == sorted(f"row {i}" for i in range(300))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("para a\n\npara b")
    both = load_corpus(str(tmp_path), txt_documents="blank_lines", valid_fraction=0.2, test_fraction=0.2)
    assert sum(len(v) for v in both.values()) == 300 + 300 + 2  # the directory, recursively


def test_bad_corpora_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string `text`"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_corpus(str(tmp_path / "broken.jsonl"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("   \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_corpus(str(empty))
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(DataError, match="split is empty"):
        load_corpus(str(tmp_path / "one.txt"))


def test_hf_corpus_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs the optional `datasets` package"):
            load_corpus("hf:wikitext/wikitext-103-raw-v1")
    else:
        with pytest.raises(DataError, match="could not load the Hugging Face dataset"):
            load_corpus("hf:this-dataset/does-not-exist-anywhere")


def test_wrap_packing_joins_documents_with_bos_eos(tiny_data):
    tok = tiny_data.tokenizer
    rows = tiny_data.rows["train"]
    assert rows.shape[1] == 32 and rows.dtype == np.int64
    stream = np.asarray(rows).reshape(-1)
    assert stream[0] == tok.bos_id
    assert (stream == tok.bos_id).sum() >= 2 and (stream == tok.eos_id).sum() >= 1
    assert not (stream == tok.pad_id).any() and not (stream == tok.mask_id).any()


def test_pad_packing_and_token_cache(tiny_data_cfg, tiny_data, tmp_path):
    tok = tiny_data.tokenizer
    docs = ["a short doc", "x" * 400]
    split = tokenize_split(docs, tok, tmp_path, "k")
    again = tokenize_split(docs, tok, tmp_path, "k")  # from the cache (memory-mapped)
    assert all(isinstance(m, np.memmap) for m in again.maps) and np.array_equal(split.tokens, again.tokens)
    rows = pack_rows(split, 16, "pad", tok)
    assert rows.shape == (2, 16)
    n = len(tok.encode("a short doc"))
    assert rows[0, 0] == tok.bos_id and rows[0, n + 1] == tok.eos_id
    assert (rows[0, n + 2 :] == tok.pad_id).all() and not (rows[1] == tok.pad_id).any()


def test_batch_indices_are_a_seeded_epoch_permutation():
    first_epoch = np.concatenate([batch_indices(10, 5, i, seed=3) for i in range(2)])
    assert sorted(first_epoch) == list(range(10))
    assert np.array_equal(batch_indices(10, 5, 7, 3), batch_indices(10, 5, 7, 3))
    assert not np.array_equal(batch_indices(10, 5, 0, 3), batch_indices(10, 5, 0, 4))


def test_an_edited_file_is_tokenized_again(tmp_path):
    """The token cache is keyed by the documents' contents, not the file's path."""
    from unmask.config import DataConfig
    from unmask.data.corpus import prepare_data

    book = tmp_path / "book.txt"
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    book.write_text("\n\n".join(" ".join(words[(i + j) % 8] for j in range(40)) for i in range(60)))
    cfg = DataConfig(corpus=str(book), seq_len=16, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, splits=("train",)).rows["train"].shape[0]
    with book.open("a") as f:  # edited in place: the same path, more text
        f.write("\n\n" + "\n\n".join(" ".join(words) * 5 for _ in range(60)))
    again = prepare_data(cfg, splits=("train",)).rows["train"].shape[0]
    assert again > first


def test_hf_corpora_name_org_slash_name_and_local_dataset_folders(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from unmask.data.corpus import DataError, load_corpus, load_hf_dataset

    seen = []

    def load_dataset(name, config=None, streaming=False):
        seen.append((name, config, streaming))
        return {"train": "T", "validation": "V"}

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_hf_dataset("hf:roneneldan/TinyStories") == {"train": "T", "validation": "V"}
    assert load_hf_dataset("hf:org/name:config-1@validation", streaming=True) == {"validation": "V"}
    assert seen == [("roneneldan/TinyStories", None, False), ("org/name", "config-1", True)]
    folder = tmp_path / "saved"
    rows = [f"document number {i} " * 20 for i in range(30)]
    datasets.Dataset.from_dict({"body": rows}).save_to_disk(str(folder))
    splits = load_corpus(f"hf:{folder}", text_field="body")
    assert sum(len(v) for v in splits.values()) == 30
    with pytest.raises(DataError, match="no column 'text'"):
        load_corpus(f"hf:{folder}")


def test_gzipped_text_jsonl_and_parquet_files_are_corpora(tmp_path):
    import gzip

    from unmask.data.corpus import DataError, load_corpus

    rows = [f"document {i}: " + "lorem ipsum dolor " * 30 for i in range(30)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": r}) + "\n" for r in rows)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\n\n".join(rows))
    n = lambda splits: sum(len(v) for v in splits.values())  # noqa: E731
    assert n(load_corpus(str(tmp_path / "a.jsonl.gz"), text_field="body")) == 30
    assert n(load_corpus(str(tmp_path / "b.txt.gz"), txt_documents="blank_lines")) == 30
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    pq.write_table(pyarrow.table({"body": rows}), tmp_path / "c.parquet")
    assert n(load_corpus(str(tmp_path / "c.parquet"), text_field="body")) == 30
    with pytest.raises(DataError, match="no column 'text'"):
        load_corpus(str(tmp_path / "c.parquet"))
