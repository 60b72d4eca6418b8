"""Known-answer reproductions on synthetic corpora (`unmask repro ... --synthetic`).

ADJUST on `codebook`: a tiny MDLM learns documents made of 4-symbol codewords. Exact sequential
sampling (one token per full forward) should give ~100% valid chunks; committing K tokens per full
forward from the marginals mixes codewords within a chunk; ADJUST's sampler, refreshing the
distributions between the K commits, should recover most of the gap. Reported beside each arm:
chunk validity (exact metric), MAUVE against the exact samples, and the sampler's validation KL
against the naive (no-refresh) KL it must beat.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from unmask.config import replace
from unmask.config_io import load_config
from unmask.models.checkpoint import load_checkpoint
from unmask.repro.common import joint_samples, train_or_reuse


def _train_base(spec: str, out: str, *, seq_len: int, steps: int, progress: bool):
    """The tiny MDLM of `tiny-mdlm` trained on a synthetic corpus into `out/base` (reused when there)."""
    cfg = load_config("tiny-mdlm")
    train = replace(cfg.train, steps=steps, batch_size=32, out=f"{out}/base", eval_every=500, save_every=500)
    cfg = replace(cfg, data=replace(cfg.data, corpus=spec, seq_len=seq_len, vocab_size=512), train=train)
    train_or_reuse(cfg, progress=progress)
    return cfg, cfg.train.out


CODEBOOK = "synthetic:codebook,codewords=16,chunk=4,alphabet=24,docs=4000,length=16"


def repro_adjust_codebook(
    *,
    out: str = "runs/repro-adjust-codebook",
    spec: str = CODEBOOK,
    train_steps: int = 1500,
    trajectories: int = 512,
    sampler_steps: int = 6000,
    samples: int = 256,
    Ks: tuple[int, ...] = (2, 4, 8),
    lr: float = 1e-3,
    progress: bool = True,
) -> dict[str, Any]:
    from unmask.data.synthetic import validity
    from unmask.decoding.refresh import Marginal, SamplerRefresh
    from unmask.evaluation.reference import load_featurizer, mauve_score
    from unmask.models.adjust_sampler import load_sampler
    from unmask.training.adjust import generate_trajectories, split_trajectories, train_sampler

    cfg, base = _train_base(spec, out, seq_len=32, steps=train_steps, progress=progress)
    loaded = load_checkpoint(base)
    model, tok = loaded.model, loaded.tokenizer
    G = cfg.data.seq_len - 1
    traj = generate_trajectories(
        model, torch.full((trajectories, 1), tok.bos_id), f"{out}/traj", new_tokens=G, progress=progress
    )
    train_part, valid_part = split_trajectories(traj, 0.1)
    samplers, kl = {}, {}
    for K in Ks:
        d = Path(f"{out}/sampler-k{K}")
        r = train_sampler(
            model, base, train_part, valid_part, K=K, out=d, steps=sampler_steps, lr=lr, progress=progress
        )
        kl[K] = {
            "start": r["history"][0]["val_kl"],
            "end": r["history"][-1]["val_kl"],
            "naive": r["history"][-1]["val_naive_kl"],
        }
        samplers[K] = load_sampler(d, base)[0]

    def decode(K: int, refresh, seed: int) -> tuple[list[str], float, int]:
        return joint_samples(model, tok, samples=samples, new_tokens=G, K=K, refresher=refresh, seed=seed)

    featurizer = load_featurizer("minilm")
    exact, exact_seconds, exact_nfe = decode(1, Marginal(), seed=1)
    second, _, _ = decode(1, Marginal(), seed=3)
    rows = [
        {
            "arm": "exact (K=1)",
            "K": 1,
            "valid_chunks": validity(spec, exact)["valid_chunks"],
            "mauve": mauve_score(exact, second, featurizer, min_samples=min(samples, 100)).score,
            "nfe": exact_nfe,
            "seconds": exact_seconds,
        }
    ]
    for K in Ks:
        for name, refresh in (("marginal", Marginal()), ("ADJUST", SamplerRefresh(samplers[K]))):
            texts, seconds, nfe = decode(K, refresh, seed=2)
            rows.append(
                {
                    "arm": f"{name} K={K}",
                    "K": K,
                    "valid_chunks": validity(spec, texts)["valid_chunks"],
                    "mauve": mauve_score(exact, texts, featurizer, min_samples=min(samples, 100)).score,
                    "nfe": nfe,
                    "seconds": seconds,
                }
            )
            if progress:
                print(
                    f"{rows[-1]['arm']}: valid chunks {rows[-1]['valid_chunks']:.3f}, MAUVE "
                    f"{rows[-1]['mauve']:.3f}",
                    file=sys.stderr,
                )
    return {
        "spec": spec,
        "rows": rows,
        "kl": kl,
        "samples": samples,
        "tokens": G,
        "trajectories": trajectories,
        "sampler_steps": sampler_steps,
        "featurizer": featurizer.name,
        "base_val_ppl": load_checkpoint(base).state.get("val_ppl"),
    }


def adjust_codebook_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['spec']}: {result['samples']} unconditional samples of {result['tokens']} tokens per arm; "
        f"MAUVE against exact samples ({result['featurizer']}; the exact row is a second exact set); "
        f"samplers trained {result['sampler_steps']} steps on {result['trajectories']} exact trajectories; "
        f"base validation ppl {result['base_val_ppl']:.3f}",
        "",
        "| arm | full forwards / sample | valid chunks | MAUVE vs exact |",
        "|---|---|---|---|",
    ]
    batches = -(-result["samples"] // 64)
    for r in result["rows"]:
        lines.append(
            f"| {r['arm']} | {r['nfe'] / batches:.0f} | {r['valid_chunks']:.3f} | {r['mauve']:.3f} |"
        )
    lines += [
        "",
        "| K | sampler KL at init | sampler KL trained | naive KL (no refresh) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {K} | {v['start']:.4f} | {v['end']:.4f} | {v['naive']:.4f} |" for K, v in result["kl"].items()
    ]
    return "\n".join(lines)


MARKOV = "synthetic:markov,vocab=64,succ=3,docs=3000,length=96"


def repro_soft_mask_markov(
    *,
    out: str = "runs/repro-soft-mask-markov",
    spec: str = MARKOV,
    base_steps: int = 1000,
    steps: int = 300,
    samples: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Soft-masking on `markov`: one base MDLM, continued `steps` updates with binary masks and with
    soft masks (k = 3, both initialisations); validation NELBO, and the forbidden-bigram rate of
    samples decoded at 1, 4, 8 and 16 tokens per step (binary inputs for the binary arm, soft inputs
    for the soft arms). Expected (Hersche et al.): soft-masking better, most at few steps."""
    from unmask.bench.sampling import run_decode
    from unmask.config import SoftMaskConfig
    from unmask.data.prompts import heldout_prompts
    from unmask.data.synthetic import validity
    from unmask.decoding.presets import preset_config
    from unmask.evaluation.perplexity import heldout_perplexity
    from unmask.repro.common import continue_training
    from unmask.schedules import build_schedule

    cfg, base = _train_base(spec, out, seq_len=64, steps=base_steps, progress=progress)
    arms = {
        "binary": SoftMaskConfig(),
        "soft k=3 (ours init)": SoftMaskConfig(k=3, p=0.8),
        "soft k=3 (reference init)": SoftMaskConfig(k=3, p=0.8, init="reference"),
    }
    new_tokens, rows = 32, []
    for name, sm in arms.items():
        run = f"{out}/{'binary' if sm.k == 0 else 'soft-' + sm.init}-{steps}"
        arm_cfg = replace(
            cfg,
            soft_mask=sm,
            train=replace(cfg.train, out=run, steps=steps, warmup=0, eval_every=steps, save_every=steps),
        )
        continue_training(arm_cfg, base, progress=progress)
        row = {"arm": name, "val_binary": heldout_perplexity(run, mc_samples=4, split="validation").ppl}
        if sm.k:
            row["val_soft"] = heldout_perplexity(run, mc_samples=4, split="validation", soft=True).ppl
        loaded = load_checkpoint(run)
        prompts = heldout_prompts(loaded.tokenizer, arm_cfg.data, samples, 8)
        schedule = build_schedule(arm_cfg.noise.schedule, arm_cfg.noise.eps)
        for per_step in (1, 4, 8, 16):
            decode = preset_config(
                "mdlm",
                inputs="soft" if sm.k else "binary",
                max_new_tokens=new_tokens,
                steps=new_tokens // per_step,
            )
            r = run_decode(
                loaded.model,
                decode,
                prompts,
                batch_size=32,
                seed=0,
                eos_id=loaded.tokenizer.eos_id,
                schedule=schedule,
            )
            texts = [loaded.tokenizer.decode(t) for t in r["samples"]]
            row[f"{per_step}/step"] = validity(spec, texts)["forbidden_bigram_rate"]
        row["soft_mask"] = loaded.model.soft_mask.values() if loaded.model.soft_mask is not None else None
        rows.append(row)
        if progress:
            print(f"{name}: {row}", file=sys.stderr)
    return {
        "spec": spec,
        "rows": rows,
        "samples": samples,
        "new_tokens": new_tokens,
        "steps": steps,
        "base_val_ppl": load_checkpoint(base).state.get("val_ppl"),
    }


def soft_mask_markov_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['spec']}: continued {result['steps']} updates from one base (validation ppl bound "
        f"{result['base_val_ppl']:.3f}); {result['samples']} held-out 8-token prompts, "
        f"{result['new_tokens']} new tokens, mdlm ancestral decoding; forbidden-bigram rate of the "
        "completions (lower is better)",
        "",
        "| arm | val PPL (binary eval) | val PPL (soft eval) | 1 tok/step | 4 | 8 | 16 | learned w_s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        soft = f"<={r['val_soft']:.3f}" if "val_soft" in r else ""
        w_s = f"{r['soft_mask']['w_s']:.3g}" if r["soft_mask"] else ""
        lines.append(
            f"| {r['arm']} | <={r['val_binary']:.3f} | {soft} | {r['1/step']:.4f} | {r['4/step']:.4f} "
            f"| {r['8/step']:.4f} | {r['16/step']:.4f} | {w_s} |"
        )
    return "\n".join(lines)
