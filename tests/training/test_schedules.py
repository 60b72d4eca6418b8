import math

import pytest
import torch

from unmask.schedules import Cosine, LinearSigma, LogLinear, clip_candidates, stratified_times

T = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)


@pytest.mark.parametrize("sched", [LogLinear(1e-3), LinearSigma(), Cosine()])
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(sched):
    alpha, dalpha = sched.alpha(T), sched.alpha_prime(T)
    assert torch.allclose(sched.weight(T), -dalpha / (1 - alpha))
    # alpha' matches a finite difference of alpha.
    h = 1e-6
    fd = (sched.alpha(T + h) - sched.alpha(T - h)) / (2 * h)
    assert torch.allclose(dalpha, fd, rtol=1e-5, atol=1e-6)


def test_closed_forms():
    assert torch.allclose(LogLinear(1e-3).weight(T), 1 / T)
    assert torch.allclose(LogLinear(0.0).alpha(T), 1 - T)
    assert float(Cosine().alpha(torch.tensor(1.0))) == pytest.approx(0.0, abs=1e-7)
    assert float(LinearSigma(20.0).alpha(torch.tensor(0.5))) == pytest.approx(math.exp(-10))


def test_stratified_times_cover_each_stratum_once():
    g = torch.Generator().manual_seed(0)
    t = stratified_times(10, 0.2, 0.7, g)
    strata = ((t - 0.2) / 0.05).floor().long().sort().values
    assert torch.equal(strata, torch.arange(10)) and t.min() >= 0.2 and t.max() <= 0.7


def test_clip_grid():
    cands = clip_candidates((0.5, 0.9), 0.05)
    assert (0.0, 0.5) in cands and (0.5, 1.0) in cands and (0.1, 1.0) in cands and (0.0, 1.0) in cands
    assert all(0 <= a < b <= 1 for a, b in cands) and len(cands) == 11 + 3 + 1


def test_the_default_clip_grid_is_bd3lms_36_intervals():
    from unmask.config import NoiseConfig

    cfg = NoiseConfig()
    cands = clip_candidates(cfg.clip_widths, cfg.clip_grid_step)
    widths = sorted({round(b - a, 6) for a, b in cands})
    assert len(cands) == len(set(cands)) == 36 and widths == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert (0.0, 1.0) in cands and (0.45, 0.95) in cands and (0.3, 0.8) in cands  # the reported best two


def test_the_full_range_can_win_the_clip_search(monkeypatch):
    """search_clip evaluates [0, 1] like any other candidate: when its variance is lowest, it wins."""
    import numpy as np

    from unmask.config import Config
    from unmask.training import clip_search

    def fake_losses(model, batch, schedule, g, t_range):  # variance grows as the interval narrows
        beta, omega = t_range
        return torch.tensor([[0.0, 1.0 - (omega - max(beta, 1e-3))]])

    monkeypatch.setattr(clip_search, "per_block_losses", fake_losses)
    rows = np.zeros((4, 8), dtype=np.int64)
    best, var = clip_search.search_clip(None, rows, LogLinear(), Config(), 0, "cpu")
    assert best == (0.0, 1.0) and var == pytest.approx(0.5 * 1e-3**2, rel=1e-3)
