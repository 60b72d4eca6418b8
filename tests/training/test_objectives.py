import math

import pytest
import torch
from conftest import MASK, VOCAB, tiny_model

from unmask.schedules import LogLinear
from unmask.training.objectives import (
    Batch,
    ar_loss,
    bd3_two_pass_logits,
    corrupt,
    diffusion_loss,
    masked_nll,
    subs_log_probs,
)


def naive_bd3_logits(model, xt, x0):
    """Reference: block b run separately as [clean blocks < b ; noisy block b]."""
    L, Lb = x0.shape[1], model.cfg.block_size
    outs = []
    for b in range(L // Lb):
        seq = torch.cat([x0[:, : b * Lb], xt[:, b * Lb : (b + 1) * Lb]], dim=1)
        outs.append(model(seq).logits[:, -Lb:])
    return torch.cat(outs, dim=1)


def random_pair(B=3, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, VOCAB - 1, (B, L), generator=g)
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, MASK, x0)
    return xt, x0


@pytest.mark.parametrize("block", [1, 4, 8, 16])
def test_vectorized_bd3_logits_equal_naive_per_block_loop(block):
    model = tiny_model("block_causal", block_size=block)
    xt, x0 = random_pair()
    fast = model.forward_bd3_train(xt, x0).logits
    assert torch.allclose(fast, naive_bd3_logits(model, xt, x0), atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast, bd3_two_pass_logits(model, xt, x0), atol=1e-5, rtol=1e-5)


def test_vectorized_bd3_loss_equals_naive_loss():
    model = tiny_model("block_causal", block_size=4)
    _, x0 = random_pair()
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool))
    sched = LogLinear()
    out = diffusion_loss(model, batch, sched, torch.Generator().manual_seed(3), (1e-3, 1.0))
    # Recompute by hand with the same random draws and the naive per-block logits.
    g = torch.Generator().manual_seed(3)
    from unmask.training.objectives import block_times

    t = block_times(3, 4, (1e-3, 1.0), g)
    xt, masked = corrupt(x0, batch.valid, t, sched, MASK, g)
    nll = masked_nll(naive_bd3_logits(model, xt, x0), x0, MASK)
    w = (1 / t).repeat_interleave(4, dim=1)
    expected = (w * nll)[masked].sum() / x0.numel()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    two = diffusion_loss(model, batch, sched, torch.Generator().manual_seed(3), (1e-3, 1.0), two_pass=True)
    assert two.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_full_block_bd3_equals_mdlm():
    """L' = L: the BD3-LM loss of a block-causal model equals the MDLM loss of the same weights."""
    bd3 = tiny_model("block_causal", block_size=16, seed=5)
    mdlm = tiny_model("bidirectional", seed=5)
    mdlm.load_state_dict(bd3.state_dict())
    _, x0 = random_pair()
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool))
    a = diffusion_loss(bd3, batch, LogLinear(), torch.Generator().manual_seed(1), (1e-3, 1.0))
    b = diffusion_loss(mdlm, batch, LogLinear(), torch.Generator().manual_seed(1), (1e-3, 1.0))
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)


def test_subs_parameterization():
    logits = torch.randn(2, 5, VOCAB)
    xt = torch.tensor([[1, MASK, 3, MASK, 5], [MASK, MASK, 2, 2, 2]])
    logp = subs_log_probs(logits, xt, MASK)
    assert torch.isneginf(logp[..., MASK]).all()
    unmasked = xt != MASK
    assert torch.equal(logp[unmasked].argmax(-1), xt[unmasked])
    assert torch.all(logp[unmasked].max(-1).values == 0)
    assert torch.allclose(logp[~unmasked].exp().sum(-1), torch.ones(int((~unmasked).sum())))


def test_perfect_denoiser_has_zero_loss_and_uniform_has_log_v_per_masked():
    """Closed forms: a denoiser that knows x0 scores 0; a uniform one scores E[w * #masked] log(V-1)."""
    x0 = torch.randint(0, VOCAB - 1, (4, 8))
    perfect = torch.full((4, 8, VOCAB), -1e4).scatter_(-1, x0[..., None], 1e4)
    assert masked_nll(perfect, x0, MASK).abs().max() < 1e-3
    uniform = torch.zeros(4, 8, VOCAB)
    assert torch.allclose(masked_nll(uniform, x0, MASK), torch.full((4, 8), math.log(VOCAB - 1)))


def test_pad_tokens_are_never_masked_or_counted():
    model = tiny_model("bidirectional")
    x0 = torch.randint(0, VOCAB - 1, (2, 16))
    valid = torch.ones_like(x0, dtype=torch.bool)
    valid[:, 10:] = False
    g = torch.Generator().manual_seed(0)
    xt, masked = corrupt(x0, valid, torch.ones(2, 1), LogLinear(), MASK, g)
    assert not masked[:, 10:].any() and masked[:, :10].all()
    out = diffusion_loss(model, Batch(x0, valid), LogLinear(), g, (1e-3, 1.0))
    assert out.tokens == 20


def test_resample_keeps_block_mask_rates_in_range():
    x0 = torch.randint(0, VOCAB - 1, (8, 64))
    valid = torch.ones_like(x0, dtype=torch.bool)
    t = torch.full((8, 4), 0.5)
    _, masked = corrupt(
        x0, valid, t, LogLinear(), MASK, torch.Generator().manual_seed(0), resample=(0.45, 0.55, 200)
    )
    frac = masked.view(8, 4, 16).float().mean(-1)
    assert ((frac >= 0.45) & (frac <= 0.55)).all()


def test_ar_loss_counts_next_tokens():
    model = tiny_model("causal")
    x0 = torch.randint(0, VOCAB - 1, (2, 9))
    out = ar_loss(model, Batch(x0, torch.ones_like(x0, dtype=torch.bool)))
    assert out.tokens == 16 and out.loss.item() > 0
