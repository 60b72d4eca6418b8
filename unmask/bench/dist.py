"""`unmask bench dist`: one training config on 1 process, and on N processes with DDP and with FSDP
(torchrun, gloo on CPU / nccl on GPU): seconds per step and what each rank holds in memory.

Each arm is a real `unmask train` run in its own processes; numbers are read from its metrics log
(median step time after the first steps; rank 0's parameter, gradient and optimizer-state bytes
and peak resident memory — ranks are symmetric)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def bench_dist(
    config: str, *, steps: int = 20, nproc: int = 2, overrides: tuple[str, ...] = ()
) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, strategy in (
            ("1 process", 1, None),
            (f"{nproc} x ddp", nproc, "ddp"),
            (f"{nproc} x fsdp", nproc, "fsdp"),
        ):
            out = Path(tmp) / name.replace(" ", "")
            argv = [
                "train",
                "--config",
                config,
                "--out",
                str(out),
                "--train.steps",
                str(steps),
                "--train.eval_every",
                "0",
                "--train.save_every",
                str(10 * steps),
                "--eval.max_rows",
                "16",
                *overrides,
                *(["--dist.strategy", strategy] if strategy else []),
            ]
            launcher = (
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
                if n > 1
                else [sys.executable]
            )
            done = subprocess.run([*launcher, "-m", "unmask", *argv], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
            records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            times = [r["step_seconds"] for r in records if "step_seconds" in r][2:]
            memory = next(r["memory"] for r in records if "memory" in r)
            rows.append(
                {
                    "arm": name,
                    "processes": n,
                    "sec_per_step": statistics.median(times),
                    "loss": [r["loss"] for r in records if "loss" in r][-1],
                    **memory,
                }
            )
    return {"config": config, "steps": steps, "rows": rows, "overrides": list(overrides)}


def dist_table(result: dict[str, Any]) -> str:
    lines = [
        "| arm | s/step | final loss | params MB/rank | grads MB/rank | optimizer MB/rank "
        "| peak RSS MB/rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['arm']} | {r['sec_per_step']:.3f} | {r['loss']:.4f} | {r['params_mb']:.1f} "
            f"| {r['grads_mb']:.1f} | {r['optimizer_mb']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)
