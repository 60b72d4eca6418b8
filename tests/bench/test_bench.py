from unmask.bench.training import bench_train, bench_train_report, matmul_peak
from unmask.config import Config, DataConfig, ModelConfig, TrainConfig


def test_bench_train_reports_ratios_flops_and_peak():
    cfg = Config(data=DataConfig(seq_len=32, vocab_size=300),
                 model=ModelConfig(attention="block_causal", block_size=8, dim=32, n_layers=1, n_heads=2),
                 train=TrainConfig(batch_size=2))
    r = bench_train(cfg, repeats=2)
    assert set(r["arms"]) == {"fp32", "bf16", "bf16 two-pass"}
    assert set(r["ratios"]) == {"bf16 over fp32", "vectorized over two-pass"}
    for arm in r["arms"].values():
        assert arm["flops_per_step"] > 0 and 0 < arm["fraction_of_peak"] < 1.5
    assert r["matmul_peak_flops"]["bf16"] > 0 and r["machine"]["torch"]
    text = bench_train_report(r)
    assert "vectorized over two-pass" in text and "of peak" in text


def test_matmul_peak_is_positive():
    assert matmul_peak(__import__("torch").float32, n=128, reps=2) > 0
