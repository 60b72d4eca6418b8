"""BD3-LM (Arriola et al., 2025) at small scale.

`repro_bd3lm`: AR, MDLM and BD3-LM L' = 16, 8, 4 trained with the same token budget on the
embedded corpus, test perplexity (NELBO bound for the diffusion arms) printed beside the table of
Arriola et al. (2025). Checkpoints are cached: a second run only evaluates.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unmask.config import Config, replace
from unmask.config_io import load_config
from unmask.data.corpus import text_pieces
from unmask.decoding.presets import preset_config
from unmask.evaluation.perplexity import heldout_perplexity
from unmask.evaluation.reference import load_reference
from unmask.models.checkpoint import load_checkpoint
from unmask.repro.common import default_featurizer, train_or_reuse
from unmask.schedules import build_schedule
from unmask.training.perplexity import Perplexity

# arm -> (shipped config, paper test PPL on LM1B, on OpenWebText; diffusion numbers are bounds)
BD3LM_ARMS = {
    "AR": ("tiny-ar", "22.83", "17.54"),
    "MDLM": ("tiny-mdlm", "<=31.78", "<=22.98"),
    "BD3-LM L'=16": ("tiny-bd3lm-16", "<=30.60", "<=22.27"),
    "BD3-LM L'=8": ("tiny-bd3lm-8", "<=29.83", "<=21.68"),
    "BD3-LM L'=4": ("tiny-bd3lm", "<=28.23", "<=20.73"),
}


@dataclass(frozen=True)
class ArmResult:
    name: str
    config: Config
    steps: int
    tokens: int
    test: Perplexity


def repro_bd3lm(
    *, steps: int | None = None, out: str = "runs/repro-bd3lm", mc_samples: int = 8, progress: bool = True
) -> list[ArmResult]:
    results = []
    for name, (config_name, _, _) in BD3LM_ARMS.items():
        cfg = load_config(config_name)
        train_cfg = replace(cfg.train, out=f"{out}/{config_name}", steps=steps or cfg.train.steps)
        cfg = replace(cfg, train=train_cfg)
        train_or_reuse(cfg, progress=progress)
        ppl = heldout_perplexity(cfg.train.out, mc_samples=mc_samples, max_rows=0)
        tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        results.append(ArmResult(name, cfg, cfg.train.steps, tokens, ppl))
    return results


def bd3lm_table(results: list[ArmResult]) -> str:
    lines = [
        "| model | steps | train tokens | test PPL (ours) | bits/byte | MC samples "
        "| paper LM1B | paper OWT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        _, lm1b, owt = BD3LM_ARMS[r.name]
        bound = "<=" if r.test.bound else ""
        lines.append(
            f"| {r.name} | {r.steps} | {r.tokens:,} | {bound}{r.test.ppl:.2f} "
            f"| {r.test.bits_per_byte:.3f} | {r.test.mc_samples} | {lm1b} | {owt} |"
        )
    return "\n".join(lines)


def sampling_comparison(
    arms: dict[str, tuple[str | Path, str, dict]],
    *,
    ar_run: str | Path,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int = 16,
    seed: int = 0,
    min_samples: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Unconditional samples (from [BOS]) of each arm `name -> (run, preset, overrides)`, scored
    side by side: gen-PPL under the AR reference, entropy, MAUVE against held-out text, speed."""
    from unmask.bench.sampling import run_decode
    from unmask.evaluation.metrics import repetition
    from unmask.evaluation.reference import generative_perplexity, mauve_score

    reference = load_reference(ar_run)
    featurizer = default_featurizer(ar_run)
    rows, heldout = [], None
    for name, (run, preset, overrides) in arms.items():
        loaded = load_checkpoint(run)
        cfg = preset_config(
            preset, **{"max_new_tokens": max_new_tokens, "steps": max_new_tokens, **overrides}
        )
        prompts = torch.full((num_samples, 1), loaded.tokenizer.bos_id)
        schedule = build_schedule(loaded.config.noise.schedule, loaded.config.noise.eps)
        r = run_decode(
            loaded.model,
            cfg,
            prompts,
            batch_size=batch_size,
            seed=seed,
            eos_id=loaded.tokenizer.eos_id,
            schedule=schedule,
        )
        texts = [loaded.tokenizer.decode(s) for s in r.pop("samples")]
        if heldout is None:
            chars = max(1, int(statistics.median(len(t) for t in texts)))
            heldout = text_pieces(f"{loaded.config.data.corpus}@test", num_samples, chars, loaded.config.data)
        g = generative_perplexity(reference, [t for t in texts if t] or [" "])
        m = mauve_score(heldout, texts, featurizer, min_samples=min_samples)
        decoder = "next-token" if loaded.model.cfg.attention == "causal" else preset
        rows.append(
            {
                "arm": name,
                "preset": decoder,
                "gen_ppl": g.ppl,
                "entropy": g.entropy,
                "mauve": m.score,
                "rep4": repetition([t.split() for t in texts])["rep4"],
                **r,
            }
        )
        if progress:
            print(
                f"{name}: gen-PPL {g.ppl:.1f}, MAUVE {m.score:.3f}, {r['tokens_per_s']:.0f} tokens/s",
                file=sys.stderr,
            )
    return {
        "rows": rows,
        "samples": num_samples,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "reference": reference.name,
        "featurizer": featurizer.name,
        "heldout_texts": len(heldout or []),
    }


def sampling_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['samples']} unconditional samples per arm, up to {result['max_new_tokens']} tokens; "
        f"gen-PPL under {result['reference']}; MAUVE vs {result['heldout_texts']} held-out pieces "
        f"({result['featurizer']})",
        "",
        "| arm | preset | NFE/sample | tokens/forward | tokens/s | gen-PPL | entropy | MAUVE "
        "| rep-4 (words) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    batches = math.ceil(result["samples"] / result["batch_size"])
    for r in result["rows"]:
        lines.append(
            f"| {r['arm']} | {r['preset']} | {r['nfe'] / batches:.0f} "
            f"| {r['tokens_per_forward']:.2f} | {r['tokens_per_s']:.0f} | {r['gen_ppl']:.1f} "
            f"| {r['entropy']:.2f} | {r['mauve']:.3f} | {r['rep4']:.3f} |"
        )
    return "\n".join(lines)


def repro_bd3lm_sampling(
    *, out: str = "runs/repro-bd3lm", num_samples: int = 128, progress: bool = True
) -> dict[str, Any]:
    """BD3-LM sampling reproduction at matched NFE (one token per call for every arm): AR with its
    KV cache, MDLM over the whole canvas, BD3-LM L' = 16/8/4 with the exact block cache."""
    L = load_config("tiny-mdlm").data.seq_len
    arms = {
        "AR": (f"{out}/tiny-ar", "mdlm", {}),
        "MDLM": (f"{out}/tiny-mdlm", "mdlm", {}),
        "BD3-LM L'=16": (f"{out}/tiny-bd3lm-16", "bd3lm", {}),
        "BD3-LM L'=8": (f"{out}/tiny-bd3lm-8", "bd3lm", {}),
        "BD3-LM L'=4": (f"{out}/tiny-bd3lm", "bd3lm", {}),
    }
    return sampling_comparison(
        arms, ar_run=f"{out}/tiny-ar", num_samples=num_samples, max_new_tokens=L - 1, progress=progress
    )
