"""Sampling benchmarks: decoders' speed beside the quality of the same samples (BENCHMARKS.md).

`bench_sample` runs presets x step budgets on one prompt set; `bench_cache` measures the exact
BD3-LM KV cache against recomputing the prefix (our presets against the families' own loops:
`unmask.bench.families`). Ratios are interleaved A B A B.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

from unmask.bench.training import interleaved, ratio
from unmask.precision import resolve_precision


class TimedModel(torch.nn.Module):
    """Wraps a denoiser and accumulates the wall time spent inside its calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        # the rest of the Denoiser protocol is the wrapped model's
        self.cfg, self.vocab_size, self.mask_id, self.subs = (
            model.cfg,
            model.vocab_size,
            model.mask_id,
            model.subs,
        )
        self.soft_mask, self.head, self.tok_embed = model.soft_mask, model.head, model.tok_embed
        self.new_cache, self.noising = model.new_cache, model.noising
        self.seconds, self.calls, self.flops = 0.0, 0, 0

    def forward(self, tokens=None, *, cache=None, embeds=None, key_mask=None, **extra):
        B, T = (tokens if embeds is None else embeds).shape[:2]
        keys = T if cache is None else max(cache.write_start + T, cache.length)
        t = time.perf_counter()
        out = self.inner(tokens, cache=cache, embeds=embeds, key_mask=key_mask, **extra)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        if hasattr(self.inner, "forward_flops"):
            self.flops += self.inner.forward_flops(B, T, keys)
        return out

    def embed(self, tokens):
        return self.inner.embed(tokens)


def run_decode(
    model,
    cfg,
    prompts: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    eos_id: int | None,
    schedule,
    precision: str = "fp32",
    sampler=None,
) -> dict[str, Any]:
    """Decode every prompt with `cfg`; time the whole run and the part inside the model."""
    from unmask.decoding.batches import Request, decode_batches
    from unmask.decoding.plan import plan_decode
    from unmask.evaluation.metrics import rep_n, unigram_entropy

    timed = TimedModel(model)
    plan = plan_decode(timed, cfg, schedule=schedule, eos_id=eos_id, precision=precision, sampler=sampler)
    rows = [Request(p, plan, seed=seed, index=i) for i, p in enumerate(prompts.tolist())]
    last = {}  # batch -> (its last state, its rows)

    def on_state(batch, state):
        last[id(batch)] = (state, len(batch))

    t0 = time.perf_counter()
    records = sorted(
        decode_batches(timed, rows, batch_size=batch_size, on_state=on_state), key=lambda r: r.request.index
    )
    outs = [r.token_ids for r in records]
    nfe = sum(state.nfe for state, _ in last.values())
    commits = sum(state.commit_passes for state, _ in last.values())
    refreshes = sum(state.refresh_passes for state, _ in last.values())
    row_forwards = sum(state.nfe * n for state, n in last.values())
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(o) for o in outs)
    prompt_tokens = prompts.numel()
    return {
        "seconds": seconds,
        "model_seconds": timed.seconds,
        "flops_per_s": timed.flops / seconds,
        "overhead_fraction": 1 - timed.seconds / seconds,
        "tokens_per_s": new_tokens / seconds,
        "tokens_per_s_with_prompt": (new_tokens + prompt_tokens) / seconds,
        "nfe": nfe,
        "commit_passes": commits,
        "refresh_passes": refreshes,
        "new_tokens": new_tokens,
        "tokens_per_forward": new_tokens / max(row_forwards, 1),
        "entropy": statistics.mean(unigram_entropy(o) for o in outs),
        "rep4": statistics.mean(rep_n(o, 4) for o in outs),
        "samples": outs,
    }


def bench_sample(
    model,
    tokenizer,
    config,
    presets: list[str],
    steps: list[int],
    *,
    prompts: torch.Tensor,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    precision: str = "fp32",
    reference=None,
    featurizer=None,
    mauve_texts: list[str] | None = None,
    min_samples: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Every preset x step budget on the same prompts: speed beside quality, one row each.
    Quality: unigram entropy and repetition always; gen-PPL with a `reference` LM; MAUVE against
    `mauve_texts` with a `featurizer`."""
    from tqdm.auto import tqdm

    from unmask.bench.training import matmul_peak
    from unmask.evaluation.metrics import repetition
    from unmask.evaluation.reference import generative_perplexity, mauve_score, require_samples
    from unmask.schedules import build_schedule

    if featurizer is not None:
        require_samples(len(mauve_texts or []), len(prompts), min_samples)
    schedule = build_schedule(config.noise.schedule, config.noise.eps)
    precision = resolve_precision(precision, "cuda" if torch.cuda.is_available() else "cpu").precision
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    rows = []
    grid = [(p, s) for p in presets for s in steps]
    warm = preset_spec(presets[0], steps=steps[0], max_new_tokens=max_new_tokens)
    run_decode(
        model,
        warm,
        prompts[:batch_size],
        batch_size=batch_size,
        seed=seed,
        eos_id=tokenizer.eos_id,
        schedule=schedule,
        precision=precision,
    )  # warm-up: one-time costs stay out of the rows
    for preset, n_steps in tqdm(grid, desc="bench sample", unit="run", disable=not progress):
        cfg = preset_spec(preset, steps=n_steps, max_new_tokens=max_new_tokens)
        r = run_decode(
            model,
            cfg,
            prompts,
            batch_size=batch_size,
            seed=seed,
            eos_id=tokenizer.eos_id,
            schedule=schedule,
            precision=precision,
        )
        samples = r.pop("samples")
        texts = [tokenizer.decode(s) for s in samples]
        r |= {f"token_{k}": v for k, v in repetition(samples).items()}
        r["fraction_of_peak"] = r["flops_per_s"] / peak
        if reference is not None:
            g = generative_perplexity(reference, texts)
            r |= {"gen_ppl": g.ppl, "gen_ppl_entropy": g.entropy}
        if featurizer is not None:
            r["mauve"] = mauve_score(mauve_texts, texts, featurizer, min_samples=min_samples).score
        rows.append({"preset": preset, "steps": n_steps, **r})
    return {
        "rows": rows,
        "matmul_peak_flops": peak,
        "prompts": len(prompts),
        "prompt_tokens": prompts.shape[1],
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "precision": precision,
        "peak_rss_mb": _peak_rss_mb(),
        "reference": getattr(reference, "name", None),
        "featurizer": getattr(featurizer, "name", None),
        "mauve_reference_texts": len(mauve_texts or []),
    }


def preset_spec(spec: str, **fixed) -> Any:
    """`NAME` or `NAME:field=value:field=value` (e.g. `fast-dllm:cache=dual`) -> its DecodeConfig."""
    import json

    from unmask.config import ConfigError
    from unmask.decoding.presets import preset_config

    name, *pairs = spec.split(":")
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--presets {spec!r}: expected NAME:field=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return preset_config(name, **{**overrides, **fixed})


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB); CUDA peak allocation when on a GPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sample_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("preset", "{}"),
        ("steps", "{}"),
        ("nfe", "{}"),
        ("tokens_per_forward", "{:.2f}"),
        ("tokens_per_s", "{:.1f}"),
        ("tokens_per_s_with_prompt", "{:.1f}"),
        ("overhead_fraction", "{:.1%}"),
        ("gen_ppl", "{:.1f}"),
        ("mauve", "{:.3f}"),
        ("entropy", "{:.2f}"),
        ("token_rep4", "{:.3f}"),
        ("token_longest_repeat", "{:.1f}"),
    ]
    cols = [(k, f) for k, f in cols if any(k in r for r in rows)]
    lines = ["| " + " | ".join(k.replace("_", " ") for k, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) if k in r else "" for k, f in cols) + " |")
    return "\n".join(lines)


def plot_sample_results(rows: list[dict[str, Any]], out_dir) -> list:
    """quality_vs_nfe.png and quality_vs_speed.png: one line per preset (gen-PPL when measured,
    else rep-4), written to `out_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    quality = "gen_ppl" if all("gen_ppl" in r for r in rows) else "token_rep4"
    label = {"gen_ppl": "gen-PPL (lower is better)", "token_rep4": "rep-4 (lower is better)"}[quality]
    paths = []
    for x, xlabel, name in (
        ("nfe", "NFE (denoiser calls)", "quality_vs_nfe.png"),
        ("tokens_per_s", "output tokens / s", "quality_vs_speed.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for preset in dict.fromkeys(r["preset"] for r in rows):
            pts = sorted((r[x], r[quality]) for r in rows if r["preset"] == preset)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=preset)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if x == "nfe":
            ax.set_xscale("log")
        if quality == "gen_ppl":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def bench_cache(
    model,
    tokenizer,
    config,
    *,
    prompts: torch.Tensor,
    max_new_tokens: int,
    steps: int,
    batch_size: int,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """BD3-LM decoding with the exact KV cache vs recomputing the whole prefix every call."""
    from unmask.decoding.presets import preset_config
    from unmask.schedules import build_schedule

    if model.cfg.attention != "block_causal":
        raise ValueError("bench cache needs a block-causal (BD3-LM) checkpoint")
    schedule = build_schedule(config.noise.schedule, config.noise.eps)
    arms = {}
    for cache in ("auto", "none"):
        cfg = preset_config("bd3lm", cache=cache, steps=steps, max_new_tokens=max_new_tokens)
        arms[cache] = lambda cfg=cfg: run_decode(
            model, cfg, prompts, batch_size=batch_size, seed=seed, eos_id=None, schedule=schedule
        )
    runs = interleaved(arms, repeats)
    same = all(a["samples"] == b["samples"] for a, b in zip(runs["auto"], runs["none"], strict=True))
    return {
        "speedup": ratio(runs, "none", "auto"),
        "identical_tokens": same,
        "cached_seconds": statistics.median(r["seconds"] for r in runs["auto"]),
        "recompute_seconds": statistics.median(r["seconds"] for r in runs["none"]),
        "nfe": runs["auto"][0]["nfe"],
        "commit_passes": runs["auto"][0]["commit_passes"],
        "block_size": model.cfg.block_size,
        "max_new_tokens": max_new_tokens,
        "steps": steps,
        "batch_size": batch_size,
        "rows": len(prompts),
        "repeats": repeats,
    }


def bench_invariance(
    model,
    config,
    presets: list[str],
    *,
    prompts: torch.Tensor,
    max_new_tokens: int,
    steps: int,
    batch_size: int,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """The batch- and cache-invariant inference ops (`unmask.models.invariant`) against the fused
    kernels, interleaved, per preset: the time ratio, and for each arm how many rows decode
    differently in a batch of `batch_size` than alone (and, on block-causal and causal models,
    with the exact cache than without)."""
    from unmask.decoding.presets import preset_config
    from unmask.models import invariant
    from unmask.schedules import build_schedule

    schedule = build_schedule(config.noise.schedule, config.noise.eps)
    cached = model.cfg.attention != "bidirectional"
    rows = []
    for preset in presets:

        def run(kernels: str, batch=batch_size, cache=None, preset=preset) -> dict[str, Any]:
            over = {} if cache is None else {"cache": cache}
            cfg = preset_config(preset, steps=steps, max_new_tokens=max_new_tokens, **over)
            with invariant.fused() if kernels == "fused" else nullcontext():
                return run_decode(
                    model, cfg, prompts, batch_size=batch, seed=seed, eos_id=None, schedule=schedule
                )

        runs = interleaved({"invariant": lambda: run("invariant"), "fused": lambda: run("fused")}, repeats)
        row: dict[str, Any] = {"preset": preset, "cost": ratio(runs, "invariant", "fused")}
        for kernels in ("invariant", "fused"):
            batched = runs[kernels][0]["samples"]
            alone = run(kernels, batch=1)["samples"]
            row[f"{kernels}_rows_batch_differs"] = sum(a != b for a, b in zip(batched, alone, strict=True))
            if cached:
                uncached = run(kernels, cache="none")["samples"]
                differs = sum(a != b for a, b in zip(batched, uncached, strict=True))
                row[f"{kernels}_rows_cache_differs"] = differs
            row[f"{kernels}_seconds"] = statistics.median(r["seconds"] for r in runs[kernels])
        rows.append(row)
    return {
        "rows": rows,
        "attention": model.cfg.attention,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "steps": steps,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def invariance_table(r: dict[str, Any]) -> str:
    cached = r["attention"] != "bidirectional"
    head = (
        "| preset | invariant s | fused s | cost (median, min-max) | rows differing batch/alone: inv, fused |"
    )
    head += " cached/uncached: inv, fused |" if cached else ""
    lines = [head, "|" + "---|" * (6 if cached else 5)]
    for row in r["rows"]:
        q = row["cost"]
        line = (
            f"| {row['preset']} | {row['invariant_seconds']:.3f} | {row['fused_seconds']:.3f} | "
            f"{q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f}) | "
            f"{row['invariant_rows_batch_differs']}, {row['fused_rows_batch_differs']} "
            f"of {r['prompts']} |"
        )
        if cached:
            line += f" {row['invariant_rows_cache_differs']}, {row['fused_rows_cache_differs']} |"
        lines.append(line)
    return "\n".join(lines)
