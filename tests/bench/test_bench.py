import time

import pytest
import torch

from unmask.bench.training import bench_train, bench_train_report, matmul_peak
from unmask.config import Config, DataConfig, ModelConfig, TrainConfig


def _cfg() -> Config:
    return Config(
        data=DataConfig(seq_len=32, vocab_size=300),
        model=ModelConfig(attention="block_causal", block_size=8, dim=32, n_layers=1, n_heads=2),
        train=TrainConfig(batch_size=2),
    )


def test_bench_train_without_native_bf16_times_the_emulated_arm_once(monkeypatch):
    monkeypatch.setenv("UNMASK_NATIVE_BF16", "0")  # this path on any CPU; it must not depend on bf16 speed
    r = bench_train(_cfg(), repeats=2)
    assert r["bf16_emulated"] is True
    assert set(r["arms"]) == {"fp32", "bf16 (emulated)", "fp32 vectorized", "fp32 two-pass"}
    assert set(r["ratios"]) == {"bf16 (emulated) over fp32", "vectorized over two-pass (fp32)"}
    for arm in r["arms"].values():
        assert arm["flops_per_step"] > 0 and arm["fraction_of_peak"] > 0
    assert r["matmul_peak_flops"]["bf16"] > 0 and r["machine"]["torch"]
    text = bench_train_report(r)
    assert "vectorized over two-pass" in text and "of peak" in text and "no native bf16" in text


def test_bench_train_interleaves_every_arm_with_native_bf16(monkeypatch):
    monkeypatch.setenv("UNMASK_NATIVE_BF16", "1")
    cfg = Config(
        data=DataConfig(seq_len=16, vocab_size=300),
        model=ModelConfig(attention="causal", dim=32, n_layers=1, n_heads=2),
        train=TrainConfig(batch_size=2),
    )
    r = bench_train(cfg, repeats=1)
    assert set(r["arms"]) == {"fp32", "bf16"} and r["bf16_emulated"] is False
    assert set(r["ratios"]["bf16 over fp32"]) == {"median", "min", "max"}


def test_matmul_peak_keeps_to_its_time_budget():
    for dtype in (torch.float32, torch.bfloat16):
        t = time.perf_counter()
        assert matmul_peak(dtype, budget_s=0.05) > 0
        # a budget, not a size: even emulated bf16 (~0.6 GFLOP/s) stops within a few budgets
        assert time.perf_counter() - t < 3.0


def test_preset_specs_carry_field_overrides():
    from unmask.bench.sampling import preset_spec
    from unmask.config import ConfigError

    cfg = preset_spec("fast-dllm:cache=dual:threshold=0.5", steps=8)
    assert (cfg.preset, cfg.cache, cfg.threshold, cfg.steps) == ("fast-dllm", "dual", 0.5, 8)
    with pytest.raises(ConfigError, match="NAME:field=value"):
        preset_spec("fast-dllm:dual")
    with pytest.raises(ConfigError, match="unknown decode field"):
        preset_spec("llada:cachee=none")
