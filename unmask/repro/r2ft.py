"""`unmask repro r2ft`: Conv + R2FT (Seo et al. 2025) in miniature, on `stdlib-functions`.

From the tiny MDLM of `repro bd3lm`: instruction SFT on (signature + docstring -> body) pairs, then
R2FT from the SFT model. Both are decoded with `llada`, `semi-ar`, `topk-glob` and `conv` on a long
canvas (256 new tokens) with a small step budget (S = L/8 = 32) for held-out prompts, and scored:
rep-4 and the longest repeated span (tokens), gen-PPL of the response given its prompt under the
AR reference, the offline win rate against the held-out answers (ref-nll judge) and answer F1,
content tokens per forward, and HumanEval pass@1. Runs are cached; a second call only decodes.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from unmask.config import replace
from unmask.config_io import load_config
from unmask.data.instruct import load_pairs
from unmask.decoding.presets import preset_config
from unmask.decoding.sample import sample
from unmask.evaluation.judge import answer_f1, judge_scores, nll_score, response_token_nlls, win_rate
from unmask.evaluation.metrics import repetition
from unmask.evaluation.reference import load_reference
from unmask.models.checkpoint import load_checkpoint
from unmask.repro.common import continue_training, train_or_reuse
from unmask.schedules import build_schedule
from unmask.training.posttrain import instruct_config

PRESETS = ("llada", "semi-ar", "topk-glob", "conv")
# The comparison's decoders as in the authors' runs: EOS-fill off everywhere, and the semi-AR
# baseline with the same top-20 + global-normalization proposals as Conv, so the table separates
# locality (Conv's gate vs hard blocks) from top-k.
ARM_SETTINGS = {"semi-ar": {"top_k": 20, "normalize": True}}


def _tag(eos: str) -> str:
    """Run-directory suffix of an `eos` setting."""
    return f"-eos-{eos}"


def train_arms(
    base: str,
    reference: str,
    out: str,
    *,
    sft_steps: int,
    r2ft_steps: int,
    seq_len: int,
    max_prompt: int,
    eos: str,
    progress: bool,
) -> dict[str, str]:
    """The base MDLM and AR reference (cached from `repro bd3lm`), then SFT and SFT + R2FT (run
    directories `sft-eos-{eos}`, `r2ft-eos-{eos}`)."""
    tag = _tag(eos)
    for name, run in (("tiny-mdlm", base), ("tiny-ar", reference)):
        cfg = load_config(name)
        train_or_reuse(replace(cfg, train=replace(cfg.train, out=run)), progress=progress)
    sft = instruct_config(base, "sft", out=f"{out}/sft{tag}")
    sft = replace(
        sft,
        data=replace(sft.data, seq_len=seq_len, valid_fraction=0.02, test_fraction=0.03),
        instruct=replace(sft.instruct, max_prompt=max_prompt, eos=eos),
        train=replace(sft.train, steps=sft_steps, eval_every=200, save_every=200),
    )
    continue_training(sft, base, progress=progress)
    r2ft = instruct_config(f"{out}/sft{tag}", "r2ft", out=f"{out}/r2ft{tag}")
    r2ft = replace(r2ft, train=replace(r2ft.train, steps=r2ft_steps, eval_every=100, save_every=100))
    continue_training(r2ft, f"{out}/sft{tag}", progress=progress)
    return {"SFT": f"{out}/sft{tag}", "SFT+R2FT": f"{out}/r2ft{tag}"}


def repro_r2ft(
    *,
    base: str = "runs/repro-bd3lm/tiny-mdlm",
    reference: str = "runs/repro-bd3lm/tiny-ar",
    out: str = "runs/repro-r2ft",
    sft_steps: int = 800,
    r2ft_steps: int = 300,
    canvas: int = 256,
    samples: int = 128,
    kernel: int = 65,
    humaneval: bool = True,
    eos: str = "tail",
    progress: bool = True,
) -> dict[str, Any]:
    """{SFT, SFT+R2FT} x PRESETS at S = canvas / 8; `kernel` is Conv's window (the paper's L/4);
    `eos` is the SFT row tail (tail: [EOS] padding masked but unscored past the first, as the
    authors; all: every [EOS] scored; first: one [EOS] then [PAD])."""
    from unmask.evaluation.humaneval import evaluate_humaneval

    seq_len, max_prompt = canvas + 64, 64
    arms = train_arms(
        base,
        reference,
        out,
        sft_steps=sft_steps,
        r2ft_steps=r2ft_steps,
        seq_len=seq_len,
        max_prompt=max_prompt,
        eos=eos,
        progress=progress,
    )
    sft = load_checkpoint(arms["SFT"])
    cfg, tok = sft.config, sft.tokenizer
    test = [p for p in load_pairs(cfg)["test"] if 1 + len(tok.encode(p.prompt)) <= max_prompt][:samples]
    prompts, answers = [p.prompt for p in test], [p.response for p in test]
    ref = load_reference(reference)
    answer_scores = judge_scores("ref-nll", prompts, answers, ref=ref)
    steps = max(1, canvas // 8)
    rows = []
    tag = _tag(eos)
    (Path(out) / "samples").mkdir(parents=True, exist_ok=True)
    for model_name, run in arms.items():
        loaded = load_checkpoint(run)
        schedule = build_schedule(loaded.config.noise.schedule, loaded.config.noise.eps)
        for preset in PRESETS:
            settings = {**ARM_SETTINGS.get(preset, {}), **({"kernel": kernel} if preset == "conv" else {})}
            decode = preset_config(preset, max_new_tokens=canvas, steps=steps, eos_fill=False, **settings)
            records = sample(loaded.model, loaded.tokenizer, prompts, decode, schedule, batch_size=16, seed=0)
            texts = [r["text"] for r in records]
            ids = [r["token_ids"] for r in records]
            nlls = [response_token_nlls(ref, p, t) for p, t in zip(prompts, texts, strict=True)]
            scored = np.concatenate([n for n in nlls if len(n)] or [np.zeros(0)])
            rep = repetition(ids)
            w = win_rate([nll_score(n) for n in nlls], answer_scores, "ref-nll")  # NLLs reused, not rescored
            row = {
                "model": model_name,
                "preset": preset,
                "rep4": rep["rep4"],
                "longest_repeat": rep["longest_repeat"],
                "gen_ppl": math.exp(float(scored.mean())) if len(scored) else math.inf,
                "win_rate": w.win_rate,
                "answer_f1": statistics.mean(answer_f1(t, a) for t, a in zip(texts, answers, strict=True)),
                "tokens_per_forward": sum(map(len, ids)) / max(1, sum(r["nfe"] for r in records)),
                "mean_tokens": statistics.mean(map(len, ids)),
                "empty": sum(not t.strip() for t in texts) / len(texts),
            }
            if humaneval:
                he = evaluate_humaneval(
                    loaded.model, loaded.tokenizer, decode, schedule, timeout=5.0, batch_size=16
                )
                row["humaneval_pass1"] = he["pass@1"]
                row["humaneval_timeouts"] = he["timeouts"]
            with open(Path(out) / "samples" / f"{model_name}{tag}-{preset}.jsonl", "w") as f:
                f.writelines(
                    json.dumps({"prompt": p, "text": t, "answer": a}) + "\n"
                    for p, t, a in zip(prompts, texts, answers, strict=True)
                )
            rows.append(row)
            if progress:
                print(
                    f"{model_name} {preset}: rep-4 {row['rep4']:.3f}, gen-PPL {row['gen_ppl']:.1f}, "
                    f"win {row['win_rate']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
    result = {
        "rows": rows,
        "prompts": len(prompts),
        "canvas": canvas,
        "eos": eos,
        "steps": steps,
        "kernel": kernel,
        "reference": ref.name,
        "sft_steps": sft_steps,
        "r2ft_steps": r2ft_steps,
        "answer_repetition": repetition([tok.encode(a) for a in answers]),
        "answer_tokens": statistics.mean(len(tok.encode(a)) for a in answers),
    }
    (Path(out) / f"results{tag}.json").write_text(json.dumps(result, indent=1))
    return result


def r2ft_table(result: dict[str, Any]) -> str:
    he = "humaneval_pass1" in result["rows"][0]
    lines = [
        f"SFT rows end with eos={result.get('eos', 'all')}; "
        f"{result['prompts']} held-out stdlib-functions prompts; canvas {result['canvas']} new tokens, "
        f"S = {result['steps']} steps; Conv kernel {result['kernel']}; gen-PPL and the win-rate judge: "
        f"{result['reference']} (response given its prompt). Held-out answers: rep-4 "
        f"{result['answer_repetition']['rep4']:.3f}, longest repeat "
        f"{result['answer_repetition']['longest_repeat']:.1f}, {result['answer_tokens']:.0f} tokens.",
        "",
        "| model | decoding | rep-4 | longest repeat | gen-PPL | win rate vs answer | answer F1 "
        "| tokens/forward | tokens | empty |" + (" HumanEval pass@1 |" if he else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if he else ""),
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['rep4']:.3f} | {r['longest_repeat']:.1f} "
            f"| {r['gen_ppl']:.1f} | {r['win_rate']:.3f} | {r['answer_f1']:.3f} "
            f"| {r['tokens_per_forward']:.2f} | {r['mean_tokens']:.0f} | {r['empty']:.2f} |"
            + (f" {r['humaneval_pass1']:.3f} |" if he else "")
        )
    return "\n".join(lines)
