"""Shared tiny fixtures: models of width 32-64 and a small slice of the embedded corpus."""

from __future__ import annotations

import pytest
import torch

from unmask.config import DataConfig, ModelConfig
from unmask.data import prepare_data
from unmask.model import Transformer

VOCAB, MASK = 67, 66


def tiny_model(attention: str = "block_causal", block_size: int = 4, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(attention=attention, block_size=block_size, dim=32, n_layers=2, n_heads=4, **kw)
    return Transformer(cfg, VOCAB, MASK).eval()


@pytest.fixture(scope="session")
def tiny_data_cfg(tmp_path_factory) -> DataConfig:
    cache = tmp_path_factory.mktemp("cache")
    return DataConfig(corpus="stdlib:json,csv,email,http,urllib,logging", seq_len=32, vocab_size=320,
                      valid_fraction=0.15, test_fraction=0.15, cache_dir=str(cache))


@pytest.fixture(scope="session")
def tiny_data(tiny_data_cfg):
    return prepare_data(tiny_data_cfg)
