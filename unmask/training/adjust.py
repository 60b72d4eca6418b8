"""ADJUST post-training (Bansal & Sanghavi, 2025): exact trajectories of the frozen base model, and
the sampler layer trained on them (same explicit loop style as `unmask.training.loop`).

Trajectories are the frozen base model's own exact decoding: one token per full forward, always
the lowest-entropy masked position, its token sampled (the `exact-joint` preset). A trajectory is
stored as its prompt plus the order of revealed positions and their tokens; any intermediate
state is rebuilt from that (`Trajectories.state`). Shards are written atomically, so an
interrupted generation resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from unmask.config import ConfigError
from unmask.decoding.generate import generate
from unmask.decoding.joint import adjust_kl, naive_kl, unroll_weights
from unmask.decoding.plan import plan_decode
from unmask.decoding.presets import preset_config
from unmask.decoding.refresh import SamplerRefresh
from unmask.decoding.rng import row_generators
from unmask.integrity import IntegrityError, sha256
from unmask.models.adjust_sampler import AdjustSampler, save_sampler
from unmask.models.denoiser import Denoiser


@dataclass(frozen=True)
class Trajectories:
    prompts: np.ndarray  # [N, P] prompt tokens (P includes [BOS])
    positions: np.ndarray  # [N, G] canvas position revealed at each step
    tokens: np.ndarray  # [N, G] token revealed at each step
    mask_id: int

    def state(self, i: int | np.ndarray, step: int) -> np.ndarray:
        """Canvas [..., P + G] of trajectory i after `step` reveals (the rest [MASK])."""
        idx = np.atleast_1d(i)
        P, G = self.prompts.shape[1], self.positions.shape[1]
        canvas = np.full((len(idx), P + G), self.mask_id, dtype=np.int64)
        canvas[:, :P] = self.prompts[idx]
        rows = np.arange(len(idx))[:, None]
        canvas[rows, self.positions[idx, :step]] = self.tokens[idx, :step]
        return canvas if np.ndim(i) else canvas[0]


def split_trajectories(traj: Trajectories, valid_fraction: float) -> tuple[Trajectories, Trajectories]:
    """The last `valid_fraction` of the trajectories held out (at least one)."""
    if not 0 < valid_fraction < 1:
        raise ConfigError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    n = max(1, round(len(traj.prompts) * valid_fraction))
    if n >= len(traj.prompts):
        raise ConfigError(f"{len(traj.prompts)} trajectories are too few to hold {n} out")
    cut = len(traj.prompts) - n

    def part(s: slice) -> Trajectories:
        return Trajectories(traj.prompts[s], traj.positions[s], traj.tokens[s], traj.mask_id)

    return part(slice(0, cut)), part(slice(cut, None))


def record_trajectories(
    model: Denoiser, prompts: torch.Tensor, new_tokens: int, generators: list[torch.Generator]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode `prompts` [B, P] exactly (one token per forward); reveal order and tokens [B, G]."""
    cfg = preset_config("exact-joint", max_new_tokens=new_tokens, steps=new_tokens, eos_fill=False)
    plan = plan_decode(model, cfg)
    B, P = prompts.shape
    positions = np.zeros((B, new_tokens), dtype=np.int64)
    tokens = np.zeros((B, new_tokens), dtype=np.int64)
    previous = (torch.arange(P + new_tokens) < P).expand(B, -1)  # only the prompt is decoded
    step = 0  # reveals so far (a block-causal model's state.step restarts with each block)
    for state in generate(model, plan, prompt=prompts, generators=generators):
        current = state.tokens[:, : P + new_tokens] != model.mask_id  # [B, <= P + G] (blocks grow)
        current = torch.cat([current, previous[:, current.shape[1] :]], dim=1)
        new = (current & ~previous).nonzero()  # one per row per step
        if len(new) == 0:  # the loop's closing state repeats the last one
            continue
        if len(new) != B:
            raise RuntimeError(f"exact decoding revealed {len(new)} tokens for {B} rows in one step")
        positions[new[:, 0].numpy(), step] = new[:, 1].numpy()
        tokens[new[:, 0].numpy(), step] = state.tokens[new[:, 0], new[:, 1]].numpy()
        previous, step = current, step + 1
    return positions, tokens


def generate_trajectories(
    model: Denoiser,
    prompts: torch.Tensor,
    out: str | Path,
    *,
    new_tokens: int,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Trajectories:
    """Trajectories for every prompt row (shards of `batch_size`, resumable), then all of them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "rows": len(prompts),
        "mask_id": model.mask_id,
    }
    meta_file = out / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        raise ValueError(f"{out} holds trajectories made with other settings: {meta_file.read_text()}")
    meta_file.write_text(json.dumps(meta))
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="trajectories", unit="shard", disable=not progress):
        shard = out / f"traj-{start:07d}.npz"
        if shard.exists() and _shard_ok(shard):
            continue
        chunk = prompts[start : start + batch_size]
        with torch.inference_mode():
            pos, tok = record_trajectories(
                model, chunk, new_tokens, row_generators(seed, range(start, start + len(chunk)))
            )
        tmp = shard.with_name(f".{shard.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, prompts=chunk.numpy(), positions=pos, tokens=tok)
        digest = sha256(tmp)
        os.replace(tmp, shard)
        shard.with_name(shard.name + ".sha256").write_text(digest)  # after: a shard without one is redone
    return load_trajectories(out)


def _shard_ok(shard: Path) -> bool:
    """A shard is kept when its digest file matches it; one that is corrupt or lacks its digest
    (killed between the two writes) is made again."""
    sidecar = shard.with_name(shard.name + ".sha256")
    if sidecar.is_file() and sidecar.read_text().strip() == sha256(shard):
        return True
    print(f"trajectories: {shard.name} is incomplete or corrupt; making it again", file=sys.stderr)
    return False


def load_trajectories(path: str | Path) -> Trajectories:
    path = Path(path)
    shards = sorted(path.glob("traj-*.npz"))
    if not shards:
        raise ValueError(f"no trajectory shards (traj-*.npz) in {path}")
    meta = json.loads((path / "meta.json").read_text())
    for shard in shards:
        sidecar = shard.with_name(shard.name + ".sha256")
        if sidecar.is_file() and sidecar.read_text().strip() != sha256(shard):
            raise IntegrityError(f"{shard}: its SHA-256 does not match {sidecar.name}: the shard is corrupt")
    parts = [np.load(s) for s in shards]
    return Trajectories(
        np.concatenate([p["prompts"] for p in parts]),
        np.concatenate([p["positions"] for p in parts]),
        np.concatenate([p["tokens"] for p in parts]),
        meta["mask_id"],
    )


# ---------------------------------------------------------------------------------------------
# ADJUST sampler training


def _windows(
    traj: Trajectories, n: int, K: int, rng: np.random.Generator, J: int | None = None, block_size: int = 0
):
    """n training windows: start states x^(s) and the next J reveals (J drawn from the unroll law).
    With `block_size` (a block-causal base) the J reveals lie in one block, as the rounds of one
    forward do in decoding."""
    G = traj.positions.shape[1]
    if G < K:
        raise ValueError(f"trajectories of {G} tokens are shorter than the unroll K={K}")
    if block_size and K > block_size:
        raise ValueError(f"K={K} rounds cannot fit in a block of {block_size} positions")
    J = J or int(rng.choice(np.arange(1, K), p=unroll_weights(K).numpy()))
    i = rng.integers(0, len(traj.prompts), n)
    s = rng.integers(0, G - J + 1, n)
    while block_size:  # redraw windows whose reveals cross a block boundary
        blocks = np.take_along_axis(traj.positions[i], s[:, None] + np.arange(J)[None, :], 1) // block_size
        bad = (blocks != blocks[:, :1]).any(-1)
        if not bad.any():
            break
        s[bad] = rng.integers(0, G - J + 1, int(bad.sum()))
    start = torch.as_tensor(np.stack([traj.state(a, b) for a, b in zip(i, s, strict=True)]))
    cols = s[:, None] + np.arange(J)[None, :]
    pos = torch.as_tensor(np.take_along_axis(traj.positions[i], cols, 1))
    tok = torch.as_tensor(np.take_along_axis(traj.tokens[i], cols, 1))
    return start, pos, tok


def train_sampler(
    base: Denoiser,
    base_path: str | Path,
    traj: Trajectories,
    valid: Trajectories,
    *,
    K: int,
    out: str | Path,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 5e-5,
    eval_every: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an ADJUST sampler on windows of K + 1 consecutive trajectory states; the base stays
    frozen. Validation KL (fixed windows, each J = 1..K) is logged; the sampler is saved to `out`
    with the digest of the base weights it belongs to."""
    if K < 2:
        raise ConfigError(f"--k must be >= 2 (a sampler refreshes K - 1 times per full forward), got {K}")
    torch.manual_seed(seed)
    base = base.eval().requires_grad_(False)
    sampler = AdjustSampler(base.cfg)
    refresh = SamplerRefresh(sampler)
    opt = torch.optim.AdamW(sampler.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    L = base.cfg.block_size if base.cfg.attention == "block_causal" else 0  # the sampler's view: one block
    fixed = [_windows(valid, 64, K, np.random.default_rng(1000 + j), J=j, block_size=L) for j in range(1, K)]
    with torch.no_grad():  # what no refresh costs on the same windows: the bar the sampler must beat
        val_naive = float(np.mean([naive_kl(base, *w).item() for w in fixed]))

    def validate() -> dict[str, float]:
        with torch.no_grad():
            kl = float(np.mean([adjust_kl(base, refresh, *w).item() for w in fixed]))
        return {"val_kl": kl, "val_naive_kl": val_naive}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("w")
    history = [{"step": 0, **validate()}]
    log.write(json.dumps(history[-1]) + "\n")
    bar = tqdm(range(steps), desc=f"adjust sampler K={K}", unit="step", disable=not progress)
    for step in bar:
        window = _windows(traj, batch_size, K, rng, block_size=L)
        loss = adjust_kl(base, refresh, *window)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sampler.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(kl=f"{loss.item():.4f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with torch.no_grad():
                train_naive = naive_kl(base, *window).item()
            history.append(
                {"step": step + 1, "train_kl": loss.item(), "train_naive_kl": train_naive, **validate()}
            )
            log.write(json.dumps(history[-1]) + "\n")
            log.flush()
    log.close()
    save_sampler(sampler, base_path, out, K=K)
    return {
        "history": history,
        "params": sum(p.numel() for p in sampler.parameters()),
        "base_params": base.num_params(),
    }
