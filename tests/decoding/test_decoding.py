"""Policies in isolation: proposals, scores, the Conv gate, selectors."""

import math

import pytest
import torch

from unmask.decoding.proposals import Distribution, Greedy, Sample, candidates, categorical
from unmask.decoding.scores import Conv, Margin, MaxProb, NegEntropy, TokenProb
from unmask.decoding.selectors import Ancestral, FirstHitting, SelectContext, Threshold, TopN, step_count
from unmask.schedules import LogLinear


def ctx(masked, confidence=None, gate=None, mass=None, step=0, steps=4, seed=0):
    B, W = masked.shape
    g = torch.Generator().manual_seed(seed)
    conf = confidence if confidence is not None else torch.rand(B, W, generator=g, dtype=torch.float64)
    return SelectContext(
        conf.masked_fill(~masked, -math.inf),
        gate if gate is not None else torch.ones(B, W),
        mass if mass is not None else torch.ones(B, W, dtype=torch.float64),
        masked,
        step,
        steps,
        torch.rand(B, W, generator=g, dtype=torch.float64),
    )


def dist_of(p: torch.Tensor, mask_id: int = -1) -> Distribution:
    """A Distribution with probabilities p (plus a [MASK] column of -inf logit at the end)."""
    logits = torch.cat([p.log(), torch.zeros(p.shape[0], 1, dtype=p.dtype)], dim=-1)
    return Distribution.from_logits(logits, logits.shape[-1] - 1)


def close(a, b):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=1e-6
    )


def test_candidates_top_k_and_top_p():
    p = torch.tensor([[0.15, 0.3, 0.5, 0.05]], dtype=torch.float64)
    d = dist_of(p)
    vals, ids = candidates(d, 2, 1.0)
    assert close(vals, [[0.5, 0.3]]) and ids.tolist() == [[2, 1]]
    vals, ids = candidates(d, 0, 0.79)  # nucleus in vocabulary order
    assert close(vals, [[0.0, 0.3, 0.5, 0.0, 0.0]]) and ids is None
    vals, _ = candidates(d, 0, 0.81)
    assert close(vals, [[0.15, 0.3, 0.5, 0.0, 0.0]])
    vals, ids = candidates(d, 3, 0.79)  # top-k, then the nucleus inside it
    assert close(vals, [[0.5, 0.3, 0.0]]) and ids.tolist() == [[2, 1, 0]]
    vals, ids = candidates(d, 0, 1.0)
    assert ids is None and close(vals, [[0.15, 0.3, 0.5, 0.05, 0.0]])
    prop = Greedy(top_k=2)(d, torch.zeros(1, dtype=torch.float64))
    assert prop.tokens.item() == 2 and prop.kept_mass.item() == pytest.approx(0.8)
    drawn = Sample(top_k=2)(
        dist_of(p.expand(4000, 4)),
        torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
    )
    freq = torch.bincount(drawn.tokens, minlength=4).double() / 4000
    assert freq[0] == freq[3] == 0 and freq[2] == pytest.approx(0.5 / 0.8, abs=0.03)


def test_categorical_draws_follow_the_distribution():
    p = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64).expand(20000, 4)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(categorical(p, u), minlength=4).double() / 20000
    assert freq[1] == 0 and torch.allclose(freq, p[0], atol=0.015)
    hot = Sample(temperature=0.01)(dist_of(p[:5].clamp_min(1e-30)), u[:5])  # near-greedy
    assert (hot.tokens == 2).all()


def test_distribution_excludes_mask_and_leaves_input_alone():
    logits = torch.randn(3, 7, dtype=torch.float64)
    before = logits.clone()
    d = Distribution.from_logits(logits, 6)
    assert torch.equal(logits, before) and (d.probs[:, 6] == 0).all()
    assert torch.allclose(d.probs[:, :6].double(), logits[:, :6].softmax(-1), atol=1e-6)


def test_nucleus_equals_full_sort():
    """The value-sort threshold gives exactly the nucleus an argsort gives."""
    g = torch.Generator().manual_seed(0)
    for temperature in (0.3, 3.0):  # peaked rows (probe suffices) and flat rows (full sort)
        logits = torch.randn(6, 2000, generator=g) / temperature
        d = Distribution.from_logits(logits, 1999)
        vals, ids = candidates(d, 0, 0.9)
        full = d.probs.double().sort(dim=-1, descending=True)
        before = full.values.cumsum(-1) - full.values
        keep = before < 0.9
        assert ids is None
        for r in range(6):
            n = int(keep[r].sum())
            kept = set(vals[r].nonzero().flatten().tolist())
            assert kept == set(full.indices[r, :n].tolist())
            assert torch.allclose(vals[r, full.indices[r, :n]], d.probs[r, full.indices[r, :n]].double())


def test_scores():
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    prop = Greedy()(dist_of(p), torch.zeros(1, dtype=torch.float64))._replace(tokens=torch.tensor([1]))
    assert TokenProb()(prop).item() == pytest.approx(0.3)
    assert MaxProb()(prop).item() == pytest.approx(0.5)
    assert Margin()(prop).item() == pytest.approx(0.2)
    assert NegEntropy()(prop).item() == pytest.approx(sum(x * math.log(x) for x in (0.5, 0.3, 0.2)))


def test_conv_gate_is_zero_beyond_half_kernel_and_grows_from_both_sides():
    K = 5
    decoded = torch.zeros(1, 20, dtype=torch.bool)
    decoded[0, :3] = True  # left context
    decoded[0, 17:] = True  # right context
    s = Conv(TokenProb(), K).gate(decoded)[0]
    dist = torch.tensor([min(abs(i - j) for j in [0, 1, 2, 17, 18, 19]) for i in range(20)])
    assert (s[dist > (K - 1) // 2] == 0).all()
    assert (s[dist <= (K - 1) // 2] >= math.tanh(1) - 1e-6).all()
    with pytest.raises(ValueError, match="positive odd width"):
        Conv(TokenProb(), 4)


def test_conv_gate_of_a_window_equals_the_whole_canvas_gate_there():
    """The decode step asks only for the active window's gate: the same numbers as the whole row's."""
    g = torch.Generator().manual_seed(0)
    for K in (1, 5, 33):
        conv = Conv(TokenProb(), K)
        for T in (1, 17, 80):
            decoded = torch.rand(3, T, generator=g) < 0.3
            decoded[2] = False  # no context: not gated
            whole = conv.gate(decoded)
            for lo in range(T):
                for hi in range(lo + 1, T + 1, 7):
                    assert torch.equal(conv.gate(decoded, (lo, hi)), whole[:, lo:hi])


def test_global_normalization_preserves_the_unmask_mass_of_mdlm():
    masked = torch.rand(3, 32, generator=torch.Generator().manual_seed(1)) < 0.7
    gate = torch.rand(3, 32, generator=torch.Generator().manual_seed(2))
    mass = torch.rand(3, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sched = LogLinear()
    plain_A, stay = Ancestral(sched).weights(ctx(masked, step=1))
    norm_A, stay2 = Ancestral(sched, normalize=True).weights(ctx(masked, gate=gate, mass=mass, step=1))
    assert torch.equal(stay, stay2)  # [B, 1]: each row's stay-masked weight
    assert torch.allclose(norm_A.sum(-1), plain_A.sum(-1))  # sum_i A_i = #masked * (a_s - a_t)
    # With equal gates and masses the per-position unmask probability equals MDLM's exactly.
    flat_A, _ = Ancestral(sched, normalize=True).weights(
        ctx(masked, gate=torch.full((3, 32), 0.3), mass=torch.full((3, 32), 0.6, dtype=torch.float64), step=1)
    )
    assert torch.allclose(flat_A, plain_A)
    t, s = 1 - 1 / 4, 1 - 2 / 4
    a_t, a_s = 1 - (1 - 1e-3) * t, 1 - (1 - 1e-3) * s
    p = plain_A / (plain_A + stay)
    assert torch.allclose(p[masked], torch.full_like(p[masked], (a_s - a_t) / (1 - a_t)))


def test_ancestral_expected_count_matches_schedule():
    masked = torch.ones(1, 4000, dtype=torch.bool)
    chosen = Ancestral(LogLinear(0.0))(ctx(masked, step=0, steps=4))
    assert chosen.float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert Ancestral(LogLinear())(ctx(masked, step=3, steps=4)).all()  # last step: everything


def test_counted_selectors():
    masked = torch.tensor([[True, True, False, True, True, True], [True] * 6])
    assert step_count(masked, 0, 3).tolist() == [2, 2]
    assert step_count(masked, 2, 3).tolist() == [5, 6]
    conf = torch.tensor(
        [[0.9, 0.1, 0.99, 0.5, 0.95, 0.2], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], dtype=torch.float64
    )
    top = TopN()(ctx(masked, conf, step=0, steps=3))
    assert top[0].tolist() == [True, False, False, False, True, False]
    assert top[1].tolist() == [False, False, False, False, True, True]
    thr = Threshold(0.45)(ctx(masked, conf, step=0, steps=3))
    assert thr[0].tolist() == [True, False, False, True, True, False]
    fh = FirstHitting()(ctx(masked, step=0, steps=6))
    assert fh.sum(-1).tolist() == [1, 1] and not (fh & ~masked).any()
