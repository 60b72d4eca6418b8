"""Soft-masking (Hersche et al., ICLR 2026) at small scale: binary vs soft-masked continued training
of the same MDLM checkpoint (iso-update and iso-compute arms), perplexity bounds and sample metrics."""

from __future__ import annotations

import sys
from typing import Any

from unmask.config import replace
from unmask.config_io import load_config
from unmask.data.corpus import text_pieces
from unmask.decoding.presets import preset_config
from unmask.evaluation.perplexity import heldout_perplexity
from unmask.evaluation.reference import load_reference
from unmask.models.checkpoint import load_checkpoint
from unmask.repro.common import continue_training, default_featurizer, train_or_reuse
from unmask.schedules import build_schedule


def repro_soft_mask(
    *,
    base: str = "runs/repro-bd3lm/tiny-mdlm",
    reference: str = "runs/repro-bd3lm/tiny-ar",
    out: str = "runs/repro-soft-mask",
    steps: int = 500,
    samples: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Soft-masking reproduction: from one base MDLM, continued training with binary masks and with
    soft masks for the same number of updates (iso-update), and binary for as many forward passes
    as soft-masking used (iso-compute: 1 + p_sm passes per step). Validation NELBO (binary and
    soft-masked evaluation), then gen-PPL, MAUVE and rep-4 of samples at 1, 2, 4 and 8 tokens per
    step."""
    from unmask.bench.sampling import run_decode
    from unmask.config import SoftMaskConfig
    from unmask.data.prompts import heldout_prompts
    from unmask.evaluation.metrics import repetition
    from unmask.evaluation.reference import generative_perplexity, mauve_score

    base_cfg = load_config("tiny-mdlm")
    train_or_reuse(replace(base_cfg, train=replace(base_cfg.train, out=base)), progress=progress)
    ar_cfg = load_config("tiny-ar")
    train_or_reuse(replace(ar_cfg, train=replace(ar_cfg.train, out=reference)), progress=progress)
    sm = SoftMaskConfig(k=3, p=0.8)
    arms = {
        "binary, iso-update": ("binary", SoftMaskConfig(), steps),
        "soft-mask k=3, iso-update": ("soft", sm, steps),
        "binary, iso-compute": ("binary", SoftMaskConfig(), round(steps * (1 + sm.p))),
    }
    featurizer = default_featurizer(reference)
    ref_lm = load_reference(reference)
    L = base_cfg.data.seq_len
    new_tokens = L - 1 - 16
    rows = []
    for name, (inputs, sm_cfg, n) in arms.items():
        run = f"{out}/{name.split(',')[0].replace(' ', '-').replace('=', '')}-{n}"
        cfg = replace(
            base_cfg,
            soft_mask=sm_cfg,
            train=replace(
                base_cfg.train,
                out=run,
                steps=n,
                warmup=0,
                eval_every=max(1, n // 4),
                save_every=max(1, n // 4),
            ),
        )
        continue_training(cfg, base, progress=progress)
        row = {
            "arm": name,
            "updates": n,
            "inputs": inputs,
            "val_binary": heldout_perplexity(run, mc_samples=8, split="validation").ppl,
        }
        if inputs == "soft":
            row["val_soft"] = heldout_perplexity(run, mc_samples=8, split="validation", soft=True).ppl
        loaded = load_checkpoint(run)
        prompts = heldout_prompts(loaded.tokenizer, cfg.data, samples, 16)
        heldout = text_pieces(f"{cfg.data.corpus}@test", samples, 4 * new_tokens, cfg.data)
        schedule = build_schedule(cfg.noise.schedule, cfg.noise.eps)
        for per_step in (1, 2, 4, 8):
            decode = preset_config(
                "mdlm", inputs=inputs, max_new_tokens=new_tokens, steps=max(1, new_tokens // per_step)
            )
            r = run_decode(
                loaded.model,
                decode,
                prompts,
                batch_size=16,
                seed=0,
                eos_id=loaded.tokenizer.eos_id,
                schedule=schedule,
            )
            texts = [loaded.tokenizer.decode(t) for t in r.pop("samples")]
            row[f"{per_step}/step"] = {
                "gen_ppl": generative_perplexity(ref_lm, [t for t in texts if t] or [" "]).ppl,
                "mauve": mauve_score(heldout, texts, featurizer, min_samples=min(samples, 100)).score,
                "rep4": repetition([t.split() for t in texts])["rep4"],
                "tokens_per_s": r["tokens_per_s"],
            }
        row["soft_mask"] = loaded.model.soft_mask.values() if loaded.model.soft_mask is not None else None
        rows.append(row)
        if progress:
            print(f"{name}: val {row['val_binary']:.2f}", file=sys.stderr)
    return {
        "rows": rows,
        "samples": samples,
        "new_tokens": new_tokens,
        "featurizer": featurizer.name,
        "reference": ref_lm.name,
        "base": base,
    }


def soft_mask_table(result: dict[str, Any]) -> str:
    lines = [
        f"continued from {result['base']}; {result['samples']} held-out prompts, "
        f"{result['new_tokens']} new tokens, mdlm ancestral decoding; gen-PPL under "
        f"{result['reference']}; MAUVE ({result['featurizer']}) vs held-out text",
        "",
        "| arm | updates | val PPL (binary eval) | val PPL (soft eval) | tokens/step | gen-PPL "
        "| MAUVE | rep-4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for per_step in (1, 2, 4, 8):
            q = r[f"{per_step}/step"]
            soft = f"<={r['val_soft']:.2f}" if "val_soft" in r else ""
            lines.append(
                f"| {r['arm']} | {r['updates']} | <={r['val_binary']:.2f} | {soft} | {per_step} "
                f"| {q['gen_ppl']:.1f} | {q['mauve']:.3f} | {q['rep4']:.3f} |"
            )
    learned = [r["soft_mask"] for r in result["rows"] if r["soft_mask"]]
    if learned:
        lines += ["", "learned scalars: " + ", ".join(f"{k}={v:.4g}" for k, v in learned[0].items())]
    return "\n".join(lines)
