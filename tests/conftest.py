"""Shared tiny fixtures: models of width 32-64 and a small slice of the embedded corpus."""

from __future__ import annotations

import os

# Tests never download: Hugging Face libraries fail at once instead of waiting on the network
# (they read these when first imported, so they are set before any test imports them).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `precision auto` picks bf16 on a CPU with native bf16 that measures it faster, fp32 elsewhere; the
# suite's parity tests compare against fp32 references, so `auto` means fp32 here on every machine
# (tests of the choice itself set this variable themselves).
os.environ.setdefault("UNMASK_NATIVE_BF16", "0")

import pytest  # noqa: E402
import torch

from unmask.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig
from unmask.data.corpus import prepare_data
from unmask.models.transformer import Transformer
from unmask.training.loop import train

VOCAB, MASK = 67, 66


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that builds a server sets torch's threads for the process (`--threads`); the next
    test starts with the suite's own count again."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_model(attention: str = "block_causal", block_size: int = 4, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(attention=attention, block_size=block_size, dim=32, n_layers=2, n_heads=4, **kw)
    return Transformer(cfg, VOCAB, MASK).eval()


@pytest.fixture(scope="session")
def tiny_data_cfg(tmp_path_factory) -> DataConfig:
    cache = tmp_path_factory.mktemp("cache")
    return DataConfig(
        corpus="stdlib:json,csv,email,http,urllib,logging",
        seq_len=32,
        vocab_size=320,
        valid_fraction=0.15,
        test_fraction=0.15,
        cache_dir=str(cache),
    )


@pytest.fixture(scope="session")
def tiny_data(tiny_data_cfg):
    return prepare_data(tiny_data_cfg)


@pytest.fixture(scope="session")
def checkpoints(tiny_data_cfg, tiny_data, tmp_path_factory) -> dict:
    """A briefly trained run of each attention kind (20 steps, dim 32): key -> run directory."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for kind in ("block_causal", "bidirectional", "causal"):
        cfg = Config(
            data=tiny_data_cfg,
            eval=EvalConfig(max_rows=64),
            model=ModelConfig(attention=kind, block_size=4, dim=32, n_layers=1, n_heads=2),
            train=TrainConfig(steps=20, batch_size=8, lr=3e-3, precision="fp32", out=str(root / kind)),
        )
        train(cfg, data=tiny_data, progress=False)
        out[kind] = root / kind
    out["ar"] = out["causal"]
    return out
