"""ADJUST (Bansal & Sanghavi, 2025) at small scale: exact joint vs marginal vs ADJUST at K tokens per
full forward, MAUVE and gen-PPL against exact samples."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from unmask.config import replace
from unmask.config_io import load_config
from unmask.evaluation.reference import load_reference
from unmask.models.checkpoint import load_checkpoint
from unmask.repro.common import default_featurizer, joint_samples, train_or_reuse


def repro_adjust(
    *,
    base: str = "runs/repro-bd3lm/tiny-mdlm",
    reference: str = "runs/repro-bd3lm/tiny-ar",
    out: str = "runs/repro-adjust",
    trajectories: int = 512,
    samples: int = 256,
    steps: int = 400,
    lr: float = 1e-3,
    progress: bool = True,
) -> dict[str, Any]:
    """ADJUST reproduction: exact one-token-per-forward samples of the base MDLM as the reference
    set; marginal and ADJUST at K = 4 and 8 as candidates; MAUVE against the reference, gen-PPL,
    and wall-clock speed-up over exact sampling (unconditional, from [BOS])."""

    from unmask.decoding.refresh import Marginal, SamplerRefresh
    from unmask.evaluation.reference import generative_perplexity, mauve_score
    from unmask.models.adjust_sampler import load_sampler
    from unmask.training.adjust import generate_trajectories, split_trajectories, train_sampler

    base_cfg = load_config("tiny-mdlm")
    train_or_reuse(replace(base_cfg, train=replace(base_cfg.train, out=base)), progress=progress)
    loaded = load_checkpoint(base)
    model, tok = loaded.model, loaded.tokenizer
    G = base_cfg.data.seq_len - 1
    bos = torch.full((trajectories, 1), tok.bos_id)
    traj = generate_trajectories(model, bos, f"{out}/traj", new_tokens=G, progress=progress)
    train_part, valid_part = split_trajectories(traj, 0.1)
    samplers, kl = {}, {}
    for K in (4, 8):
        sampler_dir = Path(f"{out}/sampler-k{K}")
        if not (sampler_dir / "sampler.json").is_file():
            r = train_sampler(
                model,
                base,
                train_part,
                valid_part,
                K=K,
                out=sampler_dir,
                steps=steps,
                lr=lr,
                progress=progress,
            )
            kl[K] = (r["history"][0]["val_kl"], r["history"][-1]["val_kl"], r["history"][-1]["val_naive_kl"])
        samplers[K] = load_sampler(sampler_dir, base)[0]

    def decode(K: int, refresh, seed: int) -> tuple[list[str], float, int]:
        return joint_samples(model, tok, samples=samples, new_tokens=G, K=K, refresher=refresh, seed=seed)

    exact_texts, exact_seconds, exact_nfe = decode(1, Marginal(), seed=1)
    featurizer = default_featurizer(reference)
    ref_lm = load_reference(reference)
    rows = [
        {
            "arm": "exact (1 token/forward)",
            "K": 1,
            "mauve": None,
            "seconds": exact_seconds,
            "nfe": exact_nfe,
            "gen_ppl": generative_perplexity(ref_lm, exact_texts).ppl,
        }
    ]
    self_check, _, _ = decode(1, Marginal(), seed=3)  # a second exact set: MAUVE's ceiling at this size
    rows[0]["mauve"] = mauve_score(exact_texts, self_check, featurizer, min_samples=min(samples, 100)).score
    for K in (4, 8):
        for name, refresh in (("marginal", Marginal()), ("ADJUST", SamplerRefresh(samplers[K]))):
            texts, seconds, nfe = decode(K, refresh, seed=2)
            m = mauve_score(exact_texts, texts, featurizer, min_samples=min(samples, 100))
            rows.append(
                {
                    "arm": f"{name} K={K}",
                    "K": K,
                    "seconds": seconds,
                    "nfe": nfe,
                    "mauve": m.score,
                    "gen_ppl": generative_perplexity(ref_lm, texts).ppl,
                }
            )
            if progress:
                print(f"{rows[-1]['arm']}: MAUVE {rows[-1]['mauve']:.3f}", file=sys.stderr)
    return {
        "rows": rows,
        "samples": samples,
        "tokens": G,
        "featurizer": featurizer.name,
        "kl": kl,
        "trajectories": trajectories,
        "sampler_params": sum(p.numel() for p in samplers[4].parameters()),
        "base_params": model.num_params(),
        "reference": ref_lm.name,
    }


def adjust_table(result: dict[str, Any]) -> str:
    exact = result["rows"][0]
    lines = [
        f"{result['samples']} unconditional samples per arm, {result['tokens']} tokens; MAUVE against "
        f"the exact samples ({result['featurizer']}); the exact row's MAUVE is a second exact set "
        f"(the ceiling at this sample size); gen-PPL under {result['reference']}; sampler "
        f"{result['sampler_params']:,} parameters "
        f"({100 * result['sampler_params'] / result['base_params']:.1f}% of the base), trained on "
        f"{result['trajectories']} trajectories",
        "",
        "| arm | full forwards / sample | MAUVE vs exact | gen-PPL | speed-up over exact |",
        "|---|---|---|---|---|",
    ]
    batches = math.ceil(result["samples"] / 64)
    for r in result["rows"]:
        lines.append(
            f"| {r['arm']} | {r['nfe'] / batches:.0f} | {r['mauve']:.3f} | {r['gen_ppl']:.1f} "
            f"| {exact['seconds'] / r['seconds']:.2f}x |"
        )
    if result["kl"]:
        lines += [
            "",
            "| K | sampler KL at init | sampler KL trained | naive KL (no refresh) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {K} | {kl[0]:.4f} | {kl[1]:.4f} | {kl[2]:.4f} |" for K, kl in result["kl"].items()]
    return "\n".join(lines)
