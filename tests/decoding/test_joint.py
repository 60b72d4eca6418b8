"""ADJUST: exact trajectories, the sampler layer and its KL objective."""

import json

import numpy as np
import pytest
import torch
from conftest import MASK, VOCAB, tiny_model

from unmask.config import ConfigError
from unmask.decoding.joint import (
    adjust_kl,
    joint_generate,
    unroll_weights,
)
from unmask.decoding.refresh import FullModel, Marginal, SamplerRefresh
from unmask.decoding.rng import row_generators
from unmask.models.adjust_sampler import AdjustSampler
from unmask.training.adjust import generate_trajectories, load_trajectories


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
        chosen = ent.gather(1, torch.as_tensor(traj.positions[:, s : s + 1]))[:, 0]
        assert torch.allclose(chosen, ent.min(-1).values, rtol=0, atol=1e-5)  # ties allowed
    first = sorted(p.name for p in tmp_path.glob("traj-*.npz"))
    (tmp_path / first[1]).unlink()  # an interrupted run: the second shard is missing
    again = generate_trajectories(model, prompts(), tmp_path, new_tokens=8, batch_size=2, progress=False)
    assert np.array_equal(again.tokens, traj.tokens) and np.array_equal(
        load_trajectories(tmp_path).positions, traj.positions
    )
    with pytest.raises(ValueError, match="other settings"):
        generate_trajectories(model, prompts(), tmp_path, new_tokens=6, batch_size=2, progress=False)


def test_kl_is_zero_when_the_sampler_is_the_full_model():
    model = tiny_model("bidirectional")
    start = torch.cat([prompts(), torch.full((4, 8), MASK)], dim=1)
    pos = torch.tensor([[3, 5], [4, 9], [10, 3], [6, 7]])
    tok = torch.randint(0, VOCAB - 1, (4, 2))
    with torch.no_grad():
        exact = adjust_kl(model, FullModel(), start, pos, tok)
        assert exact.item() == pytest.approx(0, abs=1e-6)
        sampler = AdjustSampler(model.cfg)  # untrained: the marginal baseline, which is not exact
        assert adjust_kl(model, SamplerRefresh(sampler), start, pos, tok).item() > 1e-6


def test_sampler_is_small_and_trains_only_itself():
    model = tiny_model("bidirectional").requires_grad_(False)
    sampler = AdjustSampler(model.cfg)
    n_sampler = sum(p.numel() for p in sampler.parameters())
    assert n_sampler < 0.6 * model.num_params()  # one layer (+ projection) of a 2-layer model
    start = torch.cat([prompts(), torch.full((4, 8), MASK)], dim=1)
    pos, tok = torch.tensor([[3], [4], [5], [6]]), torch.randint(0, VOCAB - 1, (4, 1))
    adjust_kl(model, SamplerRefresh(sampler), start, pos, tok).backward()
    assert all(p.grad is not None for p in sampler.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_unroll_weights():
    w = unroll_weights(4)  # J = 1..3: decoding refreshes K - 1 = 3 times per full forward
    assert len(w) == 3 and w.sum().item() == pytest.approx(1.0) and (w[:-1] > w[1:]).all()
    assert w[0] / w[1] == pytest.approx(np.exp(0.5))
    with pytest.raises(ValueError, match="K must be >= 2"):
        unroll_weights(1)


def test_the_untrained_sampler_is_the_marginal_baseline_exactly():
    """Zero output gain: the untrained sampler returns the prior, so its KL is the naive KL and its
    decoding is token for token the marginal (no-refresh) baseline."""
    from unmask.decoding.joint import naive_kl

    model = tiny_model("bidirectional")
    sampler = AdjustSampler(model.cfg)
    start = torch.cat([prompts(), torch.full((4, 8), MASK)], dim=1)
    pos = torch.tensor([[3, 5, 8], [4, 9, 10], [10, 3, 7], [6, 7, 8]])
    tok = torch.randint(0, VOCAB - 1, (4, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = adjust_kl(model, SamplerRefresh(sampler), start, pos, tok)
        naive = naive_kl(model, start, pos, tok)
    assert naive.item() > 1e-6 and ours.item() == pytest.approx(naive.item(), rel=1e-6, abs=1e-9)
    p = prompts()
    untrained = adjust(model, p, 12, 4, SamplerRefresh(sampler)).tokens
    assert torch.equal(untrained, adjust(model, p, 12, 4, Marginal()).tokens)


def exact(model, p, G, seed=0):
    from unmask.decoding.generate import final_state, generate
    from unmask.decoding.plan import plan_decode
    from unmask.decoding.presets import preset_config

    plan = plan_decode(model, preset_config("exact-joint", max_new_tokens=G, steps=G, eos_fill=False))
    return final_state(generate(model, plan, prompt=p, generators=row_generators(seed, range(len(p)))))


def adjust(model, p, G, K, refresher, seed=0, block_len=0):
    from unmask.decoding.generate import final_state

    return final_state(
        joint_generate(
            model,
            p,
            max_new_tokens=G,
            K=K,
            refresher=refresher,
            block_len=block_len,
            generators=row_generators(seed, range(len(p))),
        )
    )


def test_k1_is_exact_sequential_sampling_and_full_refresh_is_exact_for_any_k():
    model = tiny_model("bidirectional")
    p = prompts()
    reference = exact(model, p, 12)
    assert torch.equal(adjust(model, p, 12, 1, Marginal()).tokens, reference.tokens)
    for K in (2, 4, 8):
        full = adjust(model, p, 12, K, FullModel())
        assert torch.equal(full.tokens, reference.tokens)
        assert full.nfe == 12 and full.refresh_passes == 0  # each refresh is a full forward


def test_marginal_baseline_and_sampler_counts():
    model = tiny_model("bidirectional")
    p = prompts()
    marginal = adjust(model, p, 12, 4, Marginal())
    assert not (marginal.tokens == MASK).any() and marginal.nfe == 3 and marginal.refresh_passes == 0
    sampler = AdjustSampler(model.cfg)
    with_sampler = adjust(model, p, 12, 4, SamplerRefresh(sampler))
    assert with_sampler.nfe == 3 and with_sampler.refresh_passes == 9
    blocks = adjust(model, p, 12, 4, SamplerRefresh(sampler), block_len=4)
    assert blocks.nfe == 3 and not (blocks.tokens == MASK).any()
    with pytest.raises(ConfigError, match="--decode.rounds: must be >= 1"):
        adjust(model, p, 12, 0, Marginal())


@pytest.mark.parametrize("kind", ["bidirectional", "block_causal"])
def test_training_lowers_validation_kl_and_sampler_is_tied_to_its_base(checkpoints, tmp_path, kind):
    from unmask.models.adjust_sampler import load_sampler
    from unmask.models.checkpoint import CheckpointError, load_checkpoint
    from unmask.training.adjust import train_sampler

    base = load_checkpoint(checkpoints[kind])
    model = base.model
    bos = torch.full((24, 1), base.tokenizer.bos_id)
    traj = generate_trajectories(model, bos, tmp_path / "traj", new_tokens=15, batch_size=12, progress=False)
    assert (np.sort(traj.positions, 1) == np.arange(1, 16)).all()  # every position revealed once
    result = train_sampler(
        model,
        checkpoints[kind],
        traj,
        traj,
        K=4,
        out=tmp_path / "s",
        steps=30,
        batch_size=8,
        lr=3e-3,
        eval_every=30,
        progress=False,
    )
    kls = [h["val_kl"] for h in result["history"]]
    naive = result["history"][0]["val_naive_kl"]  # what no refresh costs on the same windows
    assert kls[0] == pytest.approx(naive, rel=1e-6)  # training starts at the marginal baseline ...
    assert kls[-1] < kls[0] and "train_naive_kl" in result["history"][-1]  # ... and improves on it
    sampler, same, K = load_sampler(tmp_path / "s", checkpoints[kind])
    assert K == 4 and result["params"] < result["base_params"]
    other = "block_causal" if kind == "bidirectional" else "bidirectional"
    with pytest.raises(CheckpointError, match="was trained for base"):
        load_sampler(tmp_path / "s", checkpoints[other])


def test_posttrain_cli(checkpoints, tmp_path, capsys):
    from unmask.cli.main import main

    ckpt = str(checkpoints["bidirectional"])
    main(
        [
            "posttrain",
            "adjust-data",
            "--checkpoint",
            ckpt,
            "--num-trajectories",
            "10",
            "--new-tokens",
            "8",
            "--batch-size",
            "5",
            "--out",
            str(tmp_path / "traj"),
        ]
    )
    main(
        [
            "posttrain",
            "adjust",
            "--checkpoint",
            ckpt,
            "--trajectories",
            str(tmp_path / "traj"),
            "--k",
            "2",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    out = capsys.readouterr().out
    assert "10 trajectories of 8 tokens" in out and "validation KL" in out
    sample = ["sample", "--checkpoint", ckpt, "--max-new-tokens", "8", "--num-samples", "2"]
    main(
        sample
        + [
            "--sampler",
            str(tmp_path / "s"),
            "--preset",
            "adjust",
            "--decode.rounds",
            "2",
            "--output",
            str(tmp_path / "a.jsonl"),
        ]
    )
    records = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["nfe"] == 4 for r in records)  # 8 tokens, 2 per forward
    main(sample + ["--preset", "marginal", "--decode.rounds", "4", "--output", str(tmp_path / "m.jsonl")])
    assert all(json.loads(x)["nfe"] == 2 for x in (tmp_path / "m.jsonl").read_text().splitlines())
    with pytest.raises(SystemExit):
        main(sample + ["--preset", "adjust"])
    assert "needs --sampler" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "posttrain",
                "adjust",
                "--checkpoint",
                ckpt,
                "--trajectories",
                str(tmp_path / "traj"),
                "--k",
                "1",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
    assert "--k must be >= 2" in capsys.readouterr().err  # K = 1 refreshes nothing: nothing to train


def test_bench_runs_adjust_through_the_shared_dispatch():
    from unmask.bench.sampling import run_decode
    from unmask.decoding.presets import preset_config
    from unmask.schedules import LogLinear

    model = tiny_model("bidirectional")
    sampler = AdjustSampler(model.cfg)
    cfg = preset_config("adjust", rounds=4, max_new_tokens=8, steps=8)
    r = run_decode(
        model, cfg, prompts(), batch_size=2, seed=0, eos_id=None, schedule=LogLinear(), sampler=sampler
    )
    assert r["nfe"] == 2 * 2 and r["refresh_passes"] == 2 * 6  # per batch: 2 forwards, 6 sampler passes


def test_block_causal_windows_stay_in_one_block():
    from unmask.training.adjust import Trajectories, _windows

    rng = np.random.default_rng(0)  # positions 1..15 revealed block by block (blocks of 4 from 0)
    blocks = [np.arange(1, 4), np.arange(4, 8), np.arange(8, 12), np.arange(12, 16)]
    order = np.stack([np.concatenate([rng.permutation(b) for b in blocks]) for _ in range(6)])
    traj = Trajectories(np.zeros((6, 1), dtype=np.int64), order, np.ones_like(order), MASK)
    for J in (1, 2, 3):
        _, pos, _ = _windows(traj, 64, 4, np.random.default_rng(J), J=J, block_size=4)
        assert (pos // 4 == pos[:, :1] // 4).all()
    with pytest.raises(ValueError, match="cannot fit in a block"):
        _windows(traj, 4, 8, rng, block_size=4)
