"""Post-training: ADJUST trajectories and sampler training (same loop style as train.py).

Trajectories are the frozen base model's own exact decoding: one token per full forward, always
the lowest-entropy masked position, its token sampled (the `exact-joint` preset). A trajectory is
stored as its prompt plus the order of revealed positions and their tokens; any intermediate
state is rebuilt from that (`Trajectories.state`). Shards are written atomically, so an
interrupted generation resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unmask.decoding import build_decoder, preset_config
from unmask.decoding.rng import row_generators
from unmask.generate import generate
from unmask.model import Transformer
from unmask.schedules import LogLinear


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


def record_trajectories(model: Transformer, prompts: torch.Tensor, new_tokens: int,
                        generators: list[torch.Generator]) -> tuple[np.ndarray, np.ndarray]:
    """Decode `prompts` [B, P] exactly (one token per forward); reveal order and tokens [B, G]."""
    cfg = preset_config("exact-joint", max_new_tokens=new_tokens, steps=new_tokens)
    decoder = build_decoder(cfg, LogLinear())
    B, P = prompts.shape
    positions = np.zeros((B, new_tokens), dtype=np.int64)
    tokens = np.zeros((B, new_tokens), dtype=np.int64)
    previous = (torch.arange(P + new_tokens) < P).expand(B, -1)  # only the prompt is decoded
    for state in generate(model, decoder, prompt=prompts, max_new_tokens=new_tokens, steps=new_tokens,
                          eos_fill=False, generators=generators):
        current = state.tokens != model.mask_id
        new = (current & ~previous).nonzero()  # one per row per step
        if len(new) == 0:  # the loop's closing state repeats the last one
            continue
        if len(new) != B:
            raise RuntimeError(f"exact decoding revealed {len(new)} tokens for {B} rows in one step")
        positions[new[:, 0].numpy(), state.step - 1] = new[:, 1].numpy()
        tokens[new[:, 0].numpy(), state.step - 1] = state.tokens[new[:, 0], new[:, 1]].numpy()
        previous = current
    return positions, tokens


def generate_trajectories(model: Transformer, prompts: torch.Tensor, out: str | Path, *, new_tokens: int,
                          batch_size: int = 32, seed: int = 0, progress: bool = True) -> Trajectories:
    """Trajectories for every prompt row (shards of `batch_size`, resumable), then all of them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"new_tokens": new_tokens, "batch_size": batch_size, "seed": seed, "rows": len(prompts),
            "mask_id": model.mask_id}
    meta_file = out / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        raise ValueError(f"{out} holds trajectories made with other settings: {meta_file.read_text()}")
    meta_file.write_text(json.dumps(meta))
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="trajectories", unit="shard", disable=not progress):
        shard = out / f"traj-{start:07d}.npz"
        if shard.exists():
            continue
        chunk = prompts[start:start + batch_size]
        with torch.inference_mode():
            pos, tok = record_trajectories(model, chunk, new_tokens,
                                           row_generators(seed, range(start, start + len(chunk))))
        tmp = shard.with_name(f".{shard.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, prompts=chunk.numpy(), positions=pos, tokens=tok)
        os.replace(tmp, shard)
    return load_trajectories(out)


def load_trajectories(path: str | Path) -> Trajectories:
    path = Path(path)
    shards = sorted(path.glob("traj-*.npz"))
    if not shards:
        raise ValueError(f"no trajectory shards (traj-*.npz) in {path}")
    meta = json.loads((path / "meta.json").read_text())
    parts = [np.load(s) for s in shards]
    return Trajectories(np.concatenate([p["prompts"] for p in parts]),
                        np.concatenate([p["positions"] for p in parts]),
                        np.concatenate([p["tokens"] for p in parts]), meta["mask_id"])
