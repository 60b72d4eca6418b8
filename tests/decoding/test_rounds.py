"""Commit rounds per forward (ADJUST in the one decode loop) on every model kind and policy.

References: rounds = 1 (plain `generate()`), and the full model as refresher, which must equal it
token for token whatever the score, gate, selector, input policy or cache; the untrained sampler
(zero output gain) must equal the marginal baseline; on block-causal models the sampler's refresh
must be the same with and without the exact KV cache.
"""

import pytest
import torch
from conftest import MASK, VOCAB, tiny_model
from torch import nn

from unmask.config import ConfigError
from unmask.decoding.generate import DecodeError, final_state, generate
from unmask.decoding.joint import joint_generate
from unmask.decoding.plan import plan_decode
from unmask.decoding.presets import preset_config
from unmask.decoding.refresh import FullModel, Marginal, SamplerRefresh, build_refresher
from unmask.decoding.rng import row_generators
from unmask.models.adjust_sampler import AdjustSampler
from unmask.models.transformer import Transformer
from unmask.schedules import LogLinear


def prompts(B=3, P=3):
    return torch.randint(0, VOCAB - 1, (B, P), generator=torch.Generator().manual_seed(1))


def trained_like(model) -> AdjustSampler:
    """A sampler whose refresh changes the logits (a unit output gain instead of the zero init)."""
    torch.manual_seed(5)
    sampler = AdjustSampler(model.cfg)
    nn.init.ones_(sampler.norm_out.weight)
    return sampler.eval()


MARGINAL = Marginal()


def run(model, preset, *, rounds=1, refresher=MARGINAL, G=12, steps=12, **over):
    cfg = preset_config(preset, max_new_tokens=G, steps=steps, eos_fill=False, rounds=rounds, **over)
    plan = plan_decode(model, cfg, schedule=LogLinear(), refresher=refresher)
    return final_state(generate(model, plan, prompt=prompts(), generators=row_generators(0, range(3))))


def soft_model():
    torch.manual_seed(0)
    cfg = tiny_model("bidirectional").cfg
    model = Transformer(cfg, VOCAB, MASK, soft_mask_k=3).eval()
    with torch.no_grad():
        model.soft_mask.w_s.fill_(0.5)  # a blend that visibly changes the inputs
    return model


CASES = [  # (model kind, preset, overrides)
    ("bidirectional", "exact-joint", {}),
    ("bidirectional", "conv", {}),  # ancestral + global normalization + locality gate
    ("bidirectional", "llada", {"block_len": 4}),  # top-n, semi-AR blocks
    ("bidirectional", "fast-dllm", {"block_len": 6, "threshold": 0.05}),  # threshold + prefix cache
    ("bidirectional", "mdlm", {"cache": "dual", "block_len": 6}),
    ("block_causal", "exact-joint", {}),  # exact KV cache
    ("block_causal", "bd3lm", {}),
    ("block_causal", "exact-joint", {"cache": "none"}),
    ("soft", "mdlm", {"inputs": "soft"}),
]


@pytest.mark.parametrize("kind,preset,over", CASES)
def test_full_model_refresh_equals_one_round_per_forward(kind, preset, over):
    model = soft_model() if kind == "soft" else tiny_model(kind)
    reference = run(model, preset, **over)
    for rounds in (2, 3, 5):
        full = run(model, preset, rounds=rounds, refresher=FullModel(), **over)
        assert torch.equal(full.tokens, reference.tokens), (rounds, full.tokens, reference.tokens)
        assert full.nfe == reference.nfe and full.refresh_passes == 0


@pytest.mark.parametrize("kind,preset,over", CASES)
def test_marginal_rounds_cut_forwards_and_finish(kind, preset, over):
    model = soft_model() if kind == "soft" else tiny_model(kind)
    one = run(model, preset, **over)
    four = run(model, preset, rounds=4, **over)
    assert not (four.tokens[:, 3:] == MASK).any()
    assert four.nfe < one.nfe and four.refresh_passes == 0
    if preset == "exact-joint" and "cache" not in over:  # one token per round: K per forward
        blocks = 1 if kind == "bidirectional" else 4  # block-causal: blocks of 4, the first holds 1 masked
        assert four.nfe <= -(-12 // 4) + blocks


def test_rounds_one_is_the_plain_loop_and_untrained_sampler_is_marginal():
    for kind in ("bidirectional", "block_causal"):
        model = tiny_model(kind)
        sampler = AdjustSampler(model.cfg).eval()  # zero output gain
        for K in (2, 4):
            marginal = run(model, "exact-joint", rounds=K)
            untrained = run(model, "exact-joint", rounds=K, refresher=SamplerRefresh(sampler))
            assert torch.equal(untrained.tokens, marginal.tokens)
            assert untrained.nfe == marginal.nfe and untrained.refresh_passes > 0
        assert torch.equal(
            run(model, "exact-joint", rounds=1, refresher=SamplerRefresh(sampler)).tokens,
            run(model, "exact-joint").tokens,
        )


@pytest.mark.parametrize("K", [2, 4])
def test_block_causal_adjust_is_the_same_with_and_without_the_cache(K):
    model = tiny_model("block_causal", block_size=4)
    sampler = trained_like(model)
    out = {}
    for cache in ("auto", "none"):
        out[cache] = final_state(
            joint_generate(
                model,
                prompts(),
                max_new_tokens=13,
                K=K,
                refresher=SamplerRefresh(sampler),
                cache=cache,
                generators=row_generators(0, range(3)),
            )
        )
    assert torch.equal(out["auto"].tokens, out["none"].tokens)
    assert out["auto"].nfe == out["none"].nfe and out["auto"].refresh_passes == out["none"].refresh_passes > 0
    # the refresh does something: a sampler that changes the logits changes the samples
    marginal = final_state(
        joint_generate(
            model,
            prompts(),
            max_new_tokens=13,
            K=K,
            refresher=Marginal(),
            generators=row_generators(0, range(3)),
        )
    )
    assert not torch.equal(out["auto"].tokens, marginal.tokens)


def test_sampler_on_a_block_causal_base_attends_within_blocks():
    """The sampler's view in decoding is the active block: run on a whole sequence, each block's
    output must equal the block run alone at its canvas offset."""
    model = tiny_model("block_causal", block_size=4)
    sampler = trained_like(model)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    prior = torch.randn(2, 12, model.cfg.dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = sampler(model, tokens, prior)
        for lo in (0, 4, 8):
            alone = sampler(model, tokens[:, lo : lo + 4], prior[:, lo : lo + 4], start=lo)
            torch.testing.assert_close(whole[:, lo : lo + 4], alone, rtol=1e-5, atol=1e-5)


def test_bad_rounds_and_refreshers_are_named():
    model = tiny_model("bidirectional")
    with pytest.raises(ConfigError, match="rounds: must be >= 1"):  # the plan's config is checked first
        run(model, "mdlm", rounds=0)
    with pytest.raises(DecodeError, match="need a diffusion model"):
        run(tiny_model("causal"), "mdlm", rounds=2)
    with pytest.raises(ValueError, match="needs --sampler"):
        build_refresher("sampler")
    with pytest.raises(ValueError, match="needs --decode.refresh sampler"):
        build_refresher("none", AdjustSampler(model.cfg))
    cfg = preset_config("adjust", max_new_tokens=8, steps=128, cache="auto", cfg_scale=1.0, rounds=2)
    with pytest.raises(DecodeError, match="classifier-free guidance"):
        plan_decode(model, cfg, refresher=SamplerRefresh(AdjustSampler(model.cfg)))
