import json
import math

import pytest
import torch

from unmask.config import Config, ConfigError, EvalConfig, ModelConfig, NoiseConfig, TrainConfig, replace
from unmask.integrity import write_manifest
from unmask.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from unmask.training.loop import train


def tiny_config(data_cfg, out, attention="block_causal", dropout=0.0, **train_kw) -> Config:
    train_cfg = dict(
        steps=30,
        batch_size=8,
        lr=3e-3,
        warmup=5,
        eval_every=0,
        save_every=100,
        precision="fp32",
        out=str(out),
    )
    train_cfg.update(train_kw)
    return Config(
        data=data_cfg,
        model=ModelConfig(attention=attention, block_size=8, dim=32, n_layers=2, n_heads=4, dropout=dropout),
        train=TrainConfig(**train_cfg),
        eval=EvalConfig(max_rows=64),
    )


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.parametrize("attention", ["block_causal", "bidirectional", "causal"])
def test_thirty_steps_lower_the_loss(tiny_data_cfg, tiny_data, tmp_path, attention):
    cfg = tiny_config(tiny_data_cfg, tmp_path / "run", attention)
    result = train(cfg, data=tiny_data, progress=False)
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert result.val_ppl is not None and result.val_ppl < tiny_data.tokenizer.vocab_size


def test_resume_reproduces_the_uninterrupted_run(tiny_data_cfg, tiny_data, tmp_path):
    full = tiny_config(tiny_data_cfg, tmp_path / "full", steps=12, save_every=6, ema=0.5, dropout=0.1)
    train(full, data=tiny_data, progress=False)
    part = tiny_config(tiny_data_cfg, tmp_path / "part", steps=6, save_every=6, ema=0.5, dropout=0.1)
    train(part, data=tiny_data, progress=False)
    train(replace(part, train=replace(part.train, steps=12)), resume=True, data=tiny_data, progress=False)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_resume_and_init_errors(tiny_data_cfg, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data_cfg, tmp_path / "run", steps=2)
    train(cfg, data=tiny_data, progress=False)
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(cfg, data=tiny_data, progress=False)
    changed = replace(cfg, train=replace(cfg.train, lr=1.0))
    with pytest.raises(ConfigError, match=r"--train.lr"):
        train(changed, resume=True, data=tiny_data, progress=False)
    # --resume where no complete checkpoint exists (a run killed before its first): a fresh start
    fresh = train(
        replace(cfg, train=replace(cfg.train, out=str(tmp_path / "none"))),
        resume=True,
        data=tiny_data,
        progress=False,
    )
    assert fresh.step == 2 and load_checkpoint(tmp_path / "none").state["step"] == 2


def test_clip_search_runs_and_is_saved(tiny_data_cfg, tiny_data, tmp_path):
    cfg = replace(
        tiny_config(tiny_data_cfg, tmp_path / "run", steps=4, eval_every=2),
        noise=NoiseConfig(
            clip_search=True, clip_search_batches=1, clip_widths=(0.5, 0.9), clip_grid_step=0.25
        ),
    )
    result = train(cfg, data=tiny_data, progress=False)
    loaded = load_checkpoint(tmp_path / "run")
    assert tuple(loaded.state["t_range"]) == result.t_range
    beta, omega = result.t_range
    assert round(omega - max(beta, 0.0), 2) in (0.5, 0.9) or beta == cfg.noise.eps
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("clip_loss_var" in r for r in recs) == 2


def test_checkpoint_round_trip_and_strict_loading(tiny_data_cfg, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data_cfg, tmp_path / "run", steps=3)
    train(cfg, data=tiny_data, progress=False)
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.config == cfg and loaded.state["step"] == 3
    x = torch.randint(0, 300, (2, 16))
    again = load_checkpoint(loaded.path)
    assert torch.equal(loaded.model(x).logits, again.model(x).logits)

    # Truncated weights: a clear error naming the file.
    weights = loaded.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(loaded.path, prefer_ema=False)

    # A model with an extra layer: missing/unexpected keys listed.
    bigger = replace(cfg, model=replace(cfg.model, n_layers=3))
    from unmask.models.transformer import build_model

    m3 = build_model(bigger.model, loaded.tokenizer.vocab_size, loaded.tokenizer.mask_id)
    save_checkpoint(tmp_path / "big", step=1, model=m3, config=bigger, tokenizer=loaded.tokenizer)
    cfg_file = next((tmp_path / "big").glob("ckpt-*")) / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"n_layers": 3', '"n_layers": 2'))
    write_manifest(cfg_file.parent)  # a consistent checkpoint whose config does not fit its weights
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks.2"):
        load_checkpoint(tmp_path / "big")


def test_interrupted_save_leaves_previous_checkpoint(tiny_data_cfg, tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data_cfg, tmp_path / "run", steps=2)
    train(cfg, data=tiny_data, progress=False)
    before = load_checkpoint(tmp_path / "run")
    import unmask.models.checkpoint as ck

    def killed(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", killed)  # dies after the weights, before the rename
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(
            tmp_path / "run",
            step=5,
            model=before.model,
            config=cfg,
            tokenizer=before.tokenizer,
            optimizer=torch.optim.SGD(before.model.parameters(), lr=1),
        )
    after = load_checkpoint(tmp_path / "run")
    assert after.state["step"] == 2 and after.path == before.path


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data_cfg, tiny_data, tmp_path):
    eager = tiny_config(tiny_data_cfg, tmp_path / "eager", steps=3)
    compiled = tiny_config(tiny_data_cfg, tmp_path / "compiled", steps=3, compile=True)
    train(eager, data=tiny_data, progress=False)
    train(compiled, data=tiny_data, progress=False)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_on_cuda(tiny_data_cfg, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data_cfg, tmp_path / "run", steps=10, precision="bf16")
    train(cfg, data=tiny_data, progress=False)
    curve = losses(tmp_path / "run")
    assert len(curve) == 10 and all(math.isfinite(x) for x in curve)
