"""`unmask bench data` at a tiny scale: one fresh process per size, every phase timed and its
peak RSS recorded, shards beside memory in training."""

import dataclasses

from unmask.bench.data import bench_prepare, bench_rows, data_table, make_text, parse_size
from unmask.config import Config, DataConfig, ModelConfig, TrainConfig


def test_bench_data_prepares_each_size_in_its_own_process_and_times_shards_against_memory(tmp_path):
    assert parse_size("100MB") == 100 << 20 and parse_size("2GB") == 2 << 30 and parse_size("512") == 512
    data = DataConfig(seq_len=16, vocab_size=300)
    results = bench_prepare(data, [1 << 19, 1 << 20], tmp_path)
    small, big = results
    assert abs(big["text_mb"] - 1.0) < 0.05 and big["tokens"] > 1.5 * small["tokens"] > 0
    for r in results:
        assert r["start_rss_mb"] <= r["survey_peak_rss_mb"] <= r["bpe_peak_rss_mb"] <= r["peak_rss_mb"]
        assert r["shard_bytes"] >= 2 * r["tokens"]  # uint16 tokens + the offsets and index
    corpus = make_text(tmp_path / f"corpus-{0}MB.txt", 1 << 19)
    cfg = Config(
        data=dataclasses.replace(data, corpus=str(corpus), cache_dir=str(tmp_path / "cache")),
        model=ModelConfig(block_size=4, dim=32, n_layers=1, n_heads=2),
        train=TrainConfig(batch_size=4),
    )
    rows = bench_rows(cfg, steps=1, repeats=1)
    assert rows["steps_per_s"]["shards"] > 0 and rows["steps_per_s"]["memory"] > 0
    table = data_table(results, rows)
    assert "shards/memory" in table and table.count("\n| ") == 2  # a row per size
