"""ADJUST: exact trajectories, the sampler layer and its KL objective."""

import numpy as np
import pytest
import torch
from conftest import MASK, VOCAB, tiny_model

from unmask.decoding.joint import AdjustSampler, adjust_kl, full_model_refresher, unroll_weights
from unmask.posttrain import generate_trajectories, load_trajectories


def prompts(B=4, P=3):
    return torch.randint(0, VOCAB - 1, (B, P), generator=torch.Generator().manual_seed(0))


def test_trajectories_rebuild_the_exact_states_and_resume(tmp_path):
    model = tiny_model("bidirectional")
    traj = generate_trajectories(model, prompts(), tmp_path, new_tokens=8, batch_size=2, progress=False)
    assert traj.positions.shape == (4, 8) and (np.sort(traj.positions, 1) == np.arange(3, 11)).all()
    # Rebuild: every state of a trajectory is the exact decode's state after that many calls; the
    # position revealed at step s had the lowest entropy among the masked ones at that state.
    for s in range(8):
        state = torch.as_tensor(traj.state(np.arange(4), s))
        assert int((state == MASK).sum()) == 4 * (8 - s)
        with torch.no_grad():
            logits = model(state).logits.double()
            logp = logits.index_fill(-1, torch.tensor([MASK]), -torch.inf).log_softmax(-1)
        ent = -(logp.exp() * logp.nan_to_num(neginf=0)).sum(-1)
        ent[state != MASK] = torch.inf
        chosen = ent.gather(1, torch.as_tensor(traj.positions[:, s:s + 1]))[:, 0]
        assert torch.allclose(chosen, ent.min(-1).values, rtol=0, atol=1e-5)  # ties allowed
    first = sorted(p.name for p in tmp_path.glob("traj-*.npz"))
    (tmp_path / first[1]).unlink()  # an interrupted run: the second shard is missing
    again = generate_trajectories(model, prompts(), tmp_path, new_tokens=8, batch_size=2, progress=False)
    assert np.array_equal(again.tokens, traj.tokens) and np.array_equal(load_trajectories(tmp_path).positions,
                                                                         traj.positions)
    with pytest.raises(ValueError, match="other settings"):
        generate_trajectories(model, prompts(), tmp_path, new_tokens=6, batch_size=2, progress=False)


def test_kl_is_zero_when_the_sampler_is_the_full_model():
    model = tiny_model("bidirectional")
    start = torch.cat([prompts(), torch.full((4, 8), MASK)], dim=1)
    pos = torch.tensor([[3, 5], [4, 9], [10, 3], [6, 7]])
    tok = torch.randint(0, VOCAB - 1, (4, 2))
    with torch.no_grad():
        exact = adjust_kl(model, full_model_refresher(model), start, pos, tok)
        assert exact.item() == pytest.approx(0, abs=1e-6)
        sampler = AdjustSampler(model.cfg)
        assert adjust_kl(model, sampler.refresher(model), start, pos, tok).item() > 1e-4


def test_sampler_is_small_and_trains_only_itself():
    model = tiny_model("bidirectional").requires_grad_(False)
    sampler = AdjustSampler(model.cfg)
    n_sampler = sum(p.numel() for p in sampler.parameters())
    assert n_sampler < 0.6 * model.num_params()  # one layer (+ projection) of a 2-layer model
    start = torch.cat([prompts(), torch.full((4, 8), MASK)], dim=1)
    pos, tok = torch.tensor([[3], [4], [5], [6]]), torch.randint(0, VOCAB - 1, (4, 1))
    adjust_kl(model, sampler.refresher(model), start, pos, tok).backward()
    assert all(p.grad is not None for p in sampler.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_unroll_weights():
    w = unroll_weights(4)
    assert w.sum().item() == pytest.approx(1.0) and (w[:-1] > w[1:]).all()
    assert w[0] / w[1] == pytest.approx(np.exp(0.5))
