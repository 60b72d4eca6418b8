"""Token shards on disk: the rows read from them equal rows built in memory from the documents, the
files are written atomically, damaged ones are rebuilt, and every reader streams."""

import dataclasses
import random

import numpy as np
import pytest

from unmask.data import corpus as corpus_module
from unmask.data import sources
from unmask.data import tokenize as tokenize_module
from unmask.data.corpus import batch_indices, load_corpus, prepare_data
from unmask.data.shards import ShardWriter, TokenShards, token_dtype


def _reference_rows(docs: list[str], tok, seq_len: int, packing: str) -> np.ndarray:
    """Rows built the plain way: every document encoded, [BOS] doc [EOS], in memory."""
    encoded = [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs]
    if packing == "pad":
        rows = np.full((len(docs), seq_len), tok.pad_id, dtype=np.int64)
        for i, ids in enumerate(encoded):
            rows[i, : min(len(ids), seq_len)] = ids[:seq_len]
        return rows
    stream = np.array([t for ids in encoded for t in ids], dtype=np.int64)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


@pytest.mark.parametrize("packing", ["wrap", "pad"])
def test_rows_from_shards_equal_rows_built_in_memory_and_give_the_same_batches(tiny_data_cfg, packing):
    cfg = dataclasses.replace(tiny_data_cfg, packing=packing)
    data = prepare_data(cfg)
    docs = load_corpus(cfg.corpus, valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction)
    for split in ("train", "validation", "test"):
        want = _reference_rows(docs[split], data.tokenizer, cfg.seq_len, packing)
        rows = data.rows[split]
        assert rows.shape == want.shape and np.array_equal(np.asarray(rows), want), split
        for i in range(3):  # the batches a seeded run draws
            idx = batch_indices(len(rows), 8, i, seed=5)
            assert np.array_equal(rows[idx], want[idx])
        assert np.array_equal(rows[3:11], want[3:11]) and np.array_equal(rows[-1], want[-1])
    shard = data.rows["train"].shards.maps[0]
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint16  # a 320-id vocabulary fits 16 bits


def test_shards_hold_32_bit_ids_when_the_vocabulary_needs_them_and_span_files(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=int(n)) for n in rng.integers(0, 9, size=40)]
    writer = ShardWriter(tmp_path / "split", vocab_size=70000, shard_tokens=7)
    writer.add(docs[:25])
    writer.add(docs[25:])
    shards = writer.close()
    flat = np.concatenate(docs)
    assert token_dtype(70000) == np.uint32 and len(shards.maps) == -(-len(flat) // 7)
    assert np.array_equal(shards.tokens, flat) and shards.n_docs == 40
    pos = rng.integers(0, len(flat), size=(5, 6))
    assert np.array_equal(shards.take(pos), flat[pos])
    lengths = np.diff(np.asarray(shards.offsets))
    assert lengths.tolist() == [len(d) for d in docs]
    assert not list(tmp_path.glob("*.tmp*")) and TokenShards.complete(tmp_path / "split")


def test_a_preparation_that_dies_leaves_nothing_read_as_complete(tiny_data_cfg, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_data_cfg, cache_dir=str(tmp_path / "cache"))
    real = corpus_module._documents

    def dies_midway(c):
        for n, doc in enumerate(real(c)):
            if n == 40 and c is cfg:
                raise KeyboardInterrupt
            yield doc

    # the survey and the BPE succeed; tokenizing dies part-way
    prepare_data(dataclasses.replace(cfg, packing="pad"), splits=("test",))
    monkeypatch.setattr(tokenize_module, "_documents", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        corpus_module.tokenize_corpus(cfg, prepare_data(cfg, splits=("test",)).tokenizer,
                                      corpus_module.survey_corpus(cfg), ("train",))  # fmt: skip
    monkeypatch.setattr(tokenize_module, "_documents", real)
    shard_dirs = list((tmp_path / "cache" / "shards").iterdir())
    assert not [d for d in shard_dirs if ".tmp" in d.name]  # the writer cleaned up after itself
    # a kill -9 leaves a temp folder behind: it is never read, and the next run writes its own
    ShardWriter(tmp_path / "cache" / "shards" / "x", 320).add([np.arange(5)])
    data = prepare_data(cfg)
    reference = prepare_data(tiny_data_cfg)
    assert np.array_equal(np.asarray(data.rows["train"]), np.asarray(reference.rows["train"]))


def test_a_damaged_shard_is_tokenized_again(tiny_data_cfg, tmp_path, capsys):
    cfg = dataclasses.replace(tiny_data_cfg, cache_dir=str(tmp_path / "cache"))
    want = np.asarray(prepare_data(cfg).rows["validation"])
    folder = prepare_data(cfg).rows["validation"].shards.folder
    shard = folder / "shard-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # bit rot: same size, other bytes
    shard.write_bytes(bytes(raw))
    again = prepare_data(cfg).rows["validation"]
    assert "damaged; tokenizing again" in capsys.readouterr().err
    assert np.array_equal(np.asarray(again), want)


def test_parallel_tokenization_writes_the_same_shards(tiny_data_cfg, tmp_path):
    one = prepare_data(tiny_data_cfg)
    two = prepare_data(dataclasses.replace(tiny_data_cfg, num_proc=2, cache_dir=str(tmp_path)))
    for split in ("train", "validation", "test"):
        assert np.array_equal(np.asarray(one.rows[split]), np.asarray(two.rows[split]))


def test_streamed_paragraphs_and_chunks_equal_the_whole_file_reading(tmp_path, monkeypatch):
    rng = random.Random(0)
    pieces = ["alpha", "beta gamma", "\n", "\n\n", "\n\n\n", " ", "delta epsilon zeta" * 30]
    text = "".join(rng.choice(pieces) for _ in range(4000))
    path = tmp_path / "book.txt"
    path.write_text(text)
    for block in (1, 3, 64, 1 << 20):
        with path.open() as f:
            assert list(sources._paragraphs(f, block)) == text.split("\n\n")
    longest = max(map(len, text.split("\n\n")))
    assert list(sources._streamed_chunks(path, longest // 4 + 1)) == sources.text_chunks(
        text, longest // 4 + 1
    )
    cut = list(sources._streamed_chunks(path, 100))  # paragraphs over 400 characters are cut at lines
    assert "".join("".join(cut).split()) == "".join(text.split())  # every word, in order
    assert max(map(len, cut)) < longest
    monkeypatch.setattr(sources, "STREAM_BYTES", 1000)  # this file is now "big": read as a stream
    streamed = list(sources.local_documents(path, "chunks"))
    size = max(sources.CHUNK_CHARS, path.stat().st_size // sources.CHUNKS_PER_FILE)
    assert [t for _, t in streamed] == sources.text_chunks(text, size) and len(streamed) > 3


def test_hf_data_file_folders_stream_and_a_split_can_be_named(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    texts = [f"document {i} " + "word " * (i % 7) for i in range(60)]
    datasets.Dataset.from_dict({"body": texts[:30]}).to_parquet(str(folder / "train-0.parquet"))
    datasets.Dataset.from_dict({"body": texts[30:]}).to_parquet(str(folder / "train-1.parquet"))
    whole = list(sources.iter_documents(f"hf:{folder}", text_field="body"))
    streamed = list(sources.iter_documents(f"hf:{folder}@train", text_field="body", streaming=True))
    assert [t for _, t, _ in whole] == [t for _, t, _ in streamed] == texts
    with pytest.raises(sources.DataError, match="no split 'test'"):
        list(sources.iter_documents(f"hf:{folder}@test", text_field="body"))
    cfg = corpus_module.DataConfig(corpus=f"hf:{folder}", text_field="body", streaming=True, seq_len=8,
                                   vocab_size=300, valid_fraction=0.2, test_fraction=0.2,
                                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data = prepare_data(cfg)
    assert sum(len(r) for r in data.rows.values()) > 0


def test_a_preparation_killed_with_sigkill_leaves_nothing_read_as_complete(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from unmask.bench.data import make_text
    from unmask.config import DataConfig

    corpus = make_text(tmp_path / "corpus.txt", 6 << 20)
    cfg = DataConfig(corpus=str(corpus), seq_len=16, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    code = ("import sys; from unmask.config import DataConfig; from unmask.data.corpus import prepare_data; "
            f"prepare_data(DataConfig(corpus={str(corpus)!r}, seq_len=16, vocab_size=300, "
            f"cache_dir={cfg.cache_dir!r}))")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code])
    shards = tmp_path / "cache" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and not list(shards.glob("*.tmp*/shard-*.bin")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-tokenization: a shard file is being written
    proc.wait()
    assert list(shards.glob("*.tmp*"))  # what the kill left behind
    assert all(TokenShards.complete(d) for d in shards.iterdir() if ".tmp" not in d.name)
    again = prepare_data(cfg)
    fresh = prepare_data(dataclasses.replace(cfg, cache_dir=str(tmp_path / "fresh")))
    for split in ("train", "validation", "test"):
        assert np.array_equal(np.asarray(again.rows[split]), np.asarray(fresh.rows[split]))
