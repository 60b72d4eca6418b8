"""Flags that do what they say: the comma form of tuple flags, `--device auto`, `--lora.r` never a
silent full fine-tune, `load_checkpoint(dtype=)` honoured for unmask's own checkpoints, and no
deprecation warning from our calls into transformers."""

from __future__ import annotations

import warnings

import pytest
import torch

from unmask.cli.flags import parse_overrides, resolve_device, split_tuples
from unmask.config import Config, ConfigError, LoraConfig, replace
from unmask.models.checkpoint import load_checkpoint


def test_tuple_flags_take_the_comma_form_as_well():
    args = ["--noise.clip=0.2,0.8", "--lora.targets", "q_proj,v_proj", "--train.lr", "1e-3"]
    assert split_tuples(args) == [
        "--noise.clip", "0.2", "0.8", "--lora.targets", "q_proj", "v_proj", "--train.lr", "1e-3"
    ]  # fmt: skip
    cfg = parse_overrides(Config(), ["--noise.clip=0.2,0.8", "--lora.targets", "q_proj,v_proj"], "t")
    assert cfg.noise.clip == (0.2, 0.8) and cfg.lora.targets == ("q_proj", "v_proj")
    spaced = parse_overrides(Config(), ["--noise.clip", "0.2", "0.8"], "t")
    assert spaced.noise.clip == (0.2, 0.8)


def test_device_auto_is_cuda_when_present():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


def test_lora_on_unmasks_own_backbone_is_refused_not_ignored(checkpoints, tiny_data, tmp_path):
    from unmask.training.loop import train

    cfg = load_checkpoint(checkpoints["bidirectional"]).config
    cfg = replace(cfg, lora=LoraConfig(r=8), train=replace(cfg.train, out=str(tmp_path / "run"), steps=1))
    with pytest.raises(ConfigError, match="--lora.r 8: LoRA adapters attach to a pretrained"):
        train(cfg, init=str(checkpoints["bidirectional"]), data=tiny_data, progress=False)
    assert not list((tmp_path / "run").glob("ckpt-*"))


def test_load_checkpoint_honours_dtype_for_unmask_checkpoints(checkpoints):
    assert next(load_checkpoint(checkpoints["causal"]).model.parameters()).dtype == torch.float32
    bf16 = load_checkpoint(checkpoints["causal"], dtype="bf16").model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_no_deprecation_warning_from_our_calls_into_transformers(tmp_path):
    """A cached forward of every native family: transformers must not warn about an argument we
    pass (it announced removals, e.g. `past_key_values` in 5.40)."""
    from pretrained_layouts import write_family

    for family in ("llada", "dream", "sdar", "llada2"):
        write_family(family, tmp_path / family)
        model = load_checkpoint(tmp_path / family, dtype="fp32").model
        x = torch.randint(0, 40, (1, 8))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            kv = model.new_cache(1, 16, "cpu")
            with torch.no_grad():
                model(x, cache=kv)
                kv.commit(8)
                model(x[:, :4], cache=kv)
        ours = [w for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
        assert not ours, f"{family}: {[str(w.message) for w in ours]}"
