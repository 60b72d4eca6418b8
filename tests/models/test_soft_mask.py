"""Soft-masking: the blend, the two-pass training step, decoding with soft inputs, checkpoints."""

import json

import pytest
import torch
from conftest import MASK, VOCAB

from unmask.config import Config, ConfigError, DataConfig, ModelConfig, SoftMaskConfig, TrainConfig
from unmask.decoding.generate import DecodeError, final_state, generate
from unmask.decoding.plan import plan_decode
from unmask.decoding.presets import preset_config
from unmask.decoding.rng import row_generators
from unmask.models.checkpoint import load_checkpoint
from unmask.models.soft_mask import SoftMask
from unmask.models.transformer import Transformer
from unmask.schedules import LogLinear
from unmask.training.loop import train
from unmask.training.objectives import Batch, denoise, diffusion_loss, soft_masked_logits


def sm_model(attention="bidirectional", k=3, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(attention=attention, block_size=4, dim=32, n_layers=2, n_heads=4)
    return Transformer(cfg, VOCAB, MASK, soft_mask_k=k).eval()


def noisy(seed=0, B=2, L=16):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, VOCAB - 1, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    return x0, torch.where(masked, MASK, x0), masked


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_w_s_to_zero_is_binary_masking_exactly(attention):
    model = sm_model(attention)
    with torch.no_grad():
        model.soft_mask.raw_s.fill_(-200.0)  # w_s = sigmoid(-200) underflows to 0
    x0, xt, masked = noisy()
    assert torch.equal(soft_masked_logits(model, xt, x0, masked), denoise(model, xt, x0))


def test_blend_weights_and_decoded_positions():
    model = sm_model()
    x0, xt, masked = noisy()
    logits = torch.randn(int(masked.sum()), VOCAB)
    lam, pi, ids = model.soft_mask.mix(logits, MASK)
    assert torch.allclose(pi.sum(-1), torch.ones(len(pi))) and (ids != MASK).all()
    assert ((lam > 0) & (lam < model.soft_mask.w_s)).all()
    embeds = model.soft_mask.blend(model.tok_embed, xt, masked, logits, MASK)
    assert torch.equal(embeds[~masked], model.tok_embed(xt)[~masked])  # lam = 0 where decoded
    expected = (1 - lam)[:, None] * model.tok_embed.weight[MASK] + lam[:, None] * (
        pi[..., None] * model.tok_embed(ids)
    ).sum(-2)
    assert torch.allclose(embeds[masked], expected, atol=1e-6)


def test_gradients_reach_the_three_scalars_and_not_the_first_pass():
    model = sm_model().train()
    calls = []
    model.head.register_forward_hook(lambda mod, inp, out: calls.append(out.requires_grad))
    x0, xt, masked = noisy()
    logits = soft_masked_logits(model, xt, x0, masked)
    logits[masked].logsumexp(-1).sum().backward()
    assert calls == [False, True]  # first pass without a graph, second with
    for name in ("raw_s", "raw_a", "raw_b"):
        grad = getattr(model.soft_mask, name).grad
        assert grad is not None and grad.abs() > 0, name


def test_soft_step_is_drawn_per_batch_with_probability_p():
    model = sm_model()
    x0, _, _ = noisy()
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool))
    calls = []
    model.head.register_forward_hook(lambda mod, inp, out: calls.append(1))
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        diffusion_loss(model, batch, LogLinear(), g, (1e-3, 1.0), soft_p=0.5)
    soft_steps = len(calls) - 40  # each soft step makes one extra forward
    assert 8 < soft_steps < 32


@pytest.mark.parametrize(
    "attention,preset",
    [
        ("block_causal", "bd3lm"),
        ("bidirectional", "conv"),
        ("bidirectional", "fast-dllm"),
        ("bidirectional", "mdlm"),
        ("block_causal", "llada"),
    ],
)
@pytest.mark.parametrize("schedule", ["none", "linear", "stepwise"])
def test_soft_inputs_compose_with_presets(attention, preset, schedule):
    model = sm_model(attention)
    prompt = torch.randint(0, VOCAB - 1, (2, 5), generator=torch.Generator().manual_seed(1))

    def run(inputs, rows=range(2), p=prompt):
        cfg = preset_config(preset, inputs=inputs, soft_schedule=schedule, max_new_tokens=12, steps=6)
        plan = plan_decode(model, cfg, schedule=LogLinear())
        return final_state(generate(model, plan, prompt=p, generators=row_generators(0, rows)))

    soft = run("soft")
    assert not (soft.tokens == MASK).any() and torch.equal(soft.tokens[:, :5], prompt)
    assert torch.equal(run("soft", [1], prompt[1:]).tokens[0], soft.tokens[1])  # batch invariant
    with torch.no_grad():
        model.soft_mask.raw_s.fill_(-200.0)
    assert torch.equal(run("soft").tokens, run("binary").tokens)  # w_s -> 0: binary decoding


def test_soft_inputs_need_a_soft_mask_model():
    model = sm_model(k=0)
    assert model.soft_mask is None
    cfg = preset_config("mdlm", inputs="soft")
    with pytest.raises(DecodeError, match="need a model trained with soft-masking"):
        plan_decode(model, cfg)


def test_continued_training_and_checkpoint_round_trip(tiny_data_cfg, tiny_data, tmp_path):
    base = Config(
        data=tiny_data_cfg,
        model=ModelConfig(attention="bidirectional", dim=32, n_layers=1, n_heads=2),
        train=TrainConfig(steps=2, batch_size=4, precision="fp32", out=str(tmp_path / "base")),
    )
    train(base, data=tiny_data, progress=False)
    sm = Config(
        data=tiny_data_cfg,
        model=base.model,
        soft_mask=SoftMaskConfig(k=3, p=1.0),
        train=TrainConfig(steps=6, batch_size=4, precision="fp32", warmup=0, out=str(tmp_path / "sm")),
    )
    train(sm, init=str(tmp_path / "base"), data=tiny_data, progress=False)
    loaded = load_checkpoint(tmp_path / "sm", prefer_ema=False)
    values = json.loads((loaded.path / "soft_mask.json").read_text())
    assert values == pytest.approx(loaded.model.soft_mask.values()) and values["k"] == 3
    groups = torch.load(loaded.path / "optimizer.pt", weights_only=True)["param_groups"]
    assert len(groups) == 2 and len(groups[1]["params"]) == 3  # the scalars' own group
    assert groups[1]["lr"] == pytest.approx(1e-2) and groups[1]["weight_decay"] == 0.0
    logged = [json.loads(x) for x in (tmp_path / "sm" / "metrics.jsonl").read_text().splitlines()]
    assert all("soft_mask" in r for r in logged if "loss" in r)


def test_bad_soft_mask_settings():
    with pytest.raises(ConfigError, match="--soft_mask.p: must be in \\[0, 1\\]"):
        SoftMaskConfig(p=1.5)
    with pytest.raises(ConfigError, match="--soft_mask.k"):
        SoftMaskConfig(k=-1)
    with pytest.raises(ConfigError, match="--soft_mask.k: must be <= the vocabulary size"):
        Config(data=DataConfig(vocab_size=300), soft_mask=SoftMaskConfig(k=301))
    with pytest.raises(ValueError, match="soft-mask k must be in"):
        SoftMask(0, VOCAB)


def test_cli_continued_training_takes_the_init_config(tiny_data_cfg, tiny_data, tmp_path, capsys):
    from unmask.cli.main import main

    base = Config(
        data=tiny_data_cfg,
        model=ModelConfig(attention="bidirectional", dim=32, n_layers=1, n_heads=2),
        train=TrainConfig(steps=1, batch_size=4, precision="fp32", out=str(tmp_path / "base")),
    )
    train(base, data=tiny_data, progress=False)
    main(
        [
            "train",
            "--init",
            str(tmp_path / "base"),
            "--soft-mask.k",
            "3",
            "--soft-mask.p",
            "0.8",
            "--train.steps",
            "2",
            "--out",
            str(tmp_path / "sm"),
        ]
    )
    loaded = load_checkpoint(tmp_path / "sm")
    assert loaded.config.model == base.model and loaded.model.soft_mask.k == 3
    main(["eval", "ppl", "--checkpoint", str(tmp_path / "sm"), "--mc-samples", "1", "--max-rows", "4"])
    out = capsys.readouterr().out
    assert "(binary masks) <=" in out and "(soft masks) <=" in out


def test_reference_initialisation_of_w_s():
    """--soft-mask.init reference starts w_s at the authors' ~1e-6 (plain masks at first); ours at 0.05."""
    from unmask.config import ModelConfig
    from unmask.models.transformer import build_model

    cfg = ModelConfig(attention="bidirectional", dim=32, n_layers=1, n_heads=4)
    ref = build_model(cfg, 67, 66, soft_mask_k=3, soft_mask_init="reference").soft_mask.values()["w_s"]
    ours = build_model(cfg, 67, 66, soft_mask_k=3).soft_mask.values()["w_s"]
    assert ref == pytest.approx(1e-6, rel=1e-3) and ours == pytest.approx(0.05, rel=1e-6)
