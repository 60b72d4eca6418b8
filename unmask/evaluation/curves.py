"""Training curves: the loss and validation records of one or more runs' `metrics.jsonl`, drawn to
a PNG (`unmask plot RUN... --out curves.png`)."""

from __future__ import annotations

import json
from pathlib import Path

from unmask.data.corpus import DataError


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run directory; torn lines are skipped."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run}: no metrics.jsonl (expected a run directory made by `unmask train`)")
    train, val = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            train.append(record)
        elif "val_nats" in record:
            val.append(record)
    return train, val


def plot_runs(runs: list[str | Path], out: str | Path, *, smooth: int = 1) -> Path:
    """Loss per step (a running mean over `smooth` steps) and validation nats per token, one line
    per run, to the PNG `out`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise DataError("unmask plot needs matplotlib: pip install 'unmask[eval]'") from e
    if not runs:
        raise DataError("unmask plot: name at least one run directory")
    if smooth < 1:
        raise DataError(f"--smooth must be >= 1, got {smooth}")
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        train, val = read_metrics(run)
        name = Path(run).name
        if train:
            steps = [r["step"] for r in train]
            loss = [r["loss"] for r in train]
            means = [sum(loss[max(0, i - smooth + 1) : i + 1]) / len(loss[max(0, i - smooth + 1) : i + 1])
                     for i in range(len(loss))]  # fmt: skip
            ax_loss.plot(steps, means, label=name)
        if val:
            ax_val.plot([r["step"] for r in val], [r["val_nats"] for r in val], marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss (nats / token)", title="loss")
    ax_val.set(xlabel="step", ylabel="validation nats / token (bound for diffusion)", title="validation")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
