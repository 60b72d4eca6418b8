"""Benchmarks, measured as ratios inside one run (see BENCHMARKS.md).

`bench_train`: training-step speed of one model config, arms interleaved (A B C A B C ...) after
a warm-up: fp32 vs bf16 autocast, and for BD3-LM the vectorized `[x_t ; x0]` pass vs the two-pass
(clean K/V first) formulation, both in the precision `auto` picks here. FLOPs of a step are counted
by torch's FlopCounterMode, and the achieved FLOP/s is reported against the machine's own matmul
peak measured in the same run, for a time budget rather than a fixed size.

On a CPU without native bf16 the bf16 arm is emulated (tens of times slower): it is timed once,
outside the interleaving, and labelled `bf16 (emulated)`, so the benchmark stays short anywhere.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from unmask.config import Config
from unmask.models.transformer import autocast, build_model
from unmask.precision import cpu_model, native_cpu_bf16, resolve_precision
from unmask.schedules import build_schedule
from unmask.training.objectives import Batch, ar_loss, diffusion_loss


def matmul_peak(dtype: torch.dtype, *, budget_s: float = 1.0, max_n: int = 2048) -> float:
    """Best-of FLOP/s of a square matmul in `dtype` on the CPU (or the current GPU), for about
    `budget_s` seconds: the size doubles from 128 while one product takes under a tenth of the
    budget (up to `max_n`), then the best of as many repeats as fit the rest of the budget."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    start, n = time.perf_counter(), 128
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        best = min(once(a, b), once(a, b))  # the first call carries one-time costs
        if best > budget_s / 10 or n >= max_n:
            break
        n *= 2
    while time.perf_counter() - start < budget_s:
        best = min(best, once(a, b))
    return 2 * n**3 / best


def machine_info() -> dict[str, Any]:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "commit": commit,
        "cpu": cpu_model(),
        "native_bf16": native_cpu_bf16(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _train_step(cfg: Config, precision: str, two_pass: bool) -> tuple[Callable[[], None], int]:
    """A closure doing one full training step (forward, backward, AdamW) and its tokens."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.vocab_size, 0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = build_schedule(cfg.noise.schedule, cfg.noise.eps)
    B, L = cfg.train.batch_size, cfg.data.seq_len
    x0 = torch.randint(1, cfg.data.vocab_size, (B, L), device=device)
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        with autocast(precision, device):
            if cfg.model.objective == "ar":
                out = ar_loss(model, batch)
            else:
                out = diffusion_loss(model, batch, schedule, g, (cfg.noise.eps, 1.0), two_pass=two_pass)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, B * L


def bench_train(cfg: Config, *, repeats: int = 5) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emulated = device == "cpu" and not native_cpu_bf16()
    bf16 = "bf16 (emulated)" if emulated else "bf16"
    compute = resolve_precision("auto", device).precision  # the vectorized/two-pass pair runs in it
    arms = {"fp32": ("fp32", False), bf16: ("bf16", False)}
    if cfg.model.objective == "bd3lm":
        arms[f"{compute} vectorized"] = (compute, False)
        arms[f"{compute} two-pass"] = (compute, True)
    budget = 0.25 if emulated else 1.0  # an emulated bf16 peak is slow to measure and not the point
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, budget_s=budget)}
    steps, flops = {}, {}
    for name, (precision, two_pass) in arms.items():
        steps[name], tokens = _train_step(cfg, precision, two_pass)
        with FlopCounterMode(display=False) as counter:
            steps[name]()
        flops[name] = counter.get_total_flops()

    def timed(step: Callable[[], None]) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            t = time.perf_counter()
            step()
            return {"seconds": time.perf_counter() - t}

        return run

    runs = interleaved(
        {name: timed(step) for name, step in steps.items() if name != bf16 or not emulated}, repeats
    )
    if emulated:  # once, after its warm-up step above: enough to show the cost, short enough to wait for
        runs[bf16] = [timed(steps[bf16])()]
    per_arm = {}
    for name, (precision, _) in arms.items():
        sec = statistics.median(r["seconds"] for r in runs[name])
        per_arm[name] = {
            "sec_per_step": sec,
            "tokens_per_s": tokens / sec,
            "flops_per_step": flops[name],
            "flops_per_s": flops[name] / sec,
            "fraction_of_peak": flops[name] / sec / peak[precision],
        }
    ratios = {
        f"{bf16} over fp32": ratio(runs, "fp32", bf16)
        if not emulated
        else {"median": runs["fp32"][0]["seconds"] / runs[bf16][0]["seconds"]} | {"pairs": 1}
    }
    if cfg.model.objective == "bd3lm":
        ratios[f"vectorized over two-pass ({compute})"] = ratio(
            runs, f"{compute} two-pass", f"{compute} vectorized"
        )
    return {
        "machine": machine_info(),
        "bf16_emulated": emulated,
        "model": cfg.model.__dict__ | {"objective": cfg.model.objective},
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "vocab_size": cfg.data.vocab_size,
        "repeats": repeats,
        "params": build_model(cfg.model, cfg.data.vocab_size, 0).num_params(),
        "matmul_peak_flops": peak,
        "arms": per_arm,
        "ratios": ratios,
    }


def bench_train_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, GPU {m['gpu']}, commit {m['commit']}",
        f"model: {r['model']['objective']} dim {r['model']['dim']} x {r['model']['n_layers']} "
        f"layers, {r['params'] / 1e6:.2f}M params; batch {r['batch_size']} x {r['seq_len']}",
        f"matmul peak: fp32 {r['matmul_peak_flops']['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {r['matmul_peak_flops']['bf16'] / 1e9:.0f} GFLOP/s",
        "",
        "| arm | s/step | tokens/s | GFLOP/step | GFLOP/s | of peak (same dtype) |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in r["arms"].items():
        lines.append(
            f"| {name} | {a['sec_per_step']:.3f} | {a['tokens_per_s']:,.0f} "
            f"| {a['flops_per_step'] / 1e9:.1f} | {a['flops_per_s'] / 1e9:.0f} "
            f"| {100 * a['fraction_of_peak']:.0f}% |"
        )
    lines.append("")
    for name, q in r["ratios"].items():
        if "min" in q:
            lines.append(
                f"{name}: {q['median']:.2f}x (min {q['min']:.2f}, max {q['max']:.2f}, "
                f"{r['repeats']} interleaved pairs)"
            )
        else:
            lines.append(f"{name}: {q['median']:.3f}x (one timed step: this CPU has no native bf16)")
    return "\n".join(lines)


def interleaved(arms: dict[str, Callable[[], dict[str, Any]]], repeats: int) -> dict[str, list[dict]]:
    """Run each arm once to warm up, then `repeats` rounds A B A B ...; all results per arm."""
    for fn in arms.values():
        fn()
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            runs[name].append(fn())
    return runs


def ratio(runs, slow: str, fast: str, key: str = "seconds") -> dict[str, float]:
    r = [a[key] / b[key] for a, b in zip(runs[slow], runs[fast], strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}
