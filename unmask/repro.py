"""Small-scale reproductions of the papers' results, and the demo (the main job).

`repro_bd3lm`: AR, MDLM and BD3-LM L' = 16, 8, 4 trained with the same token budget on the
embedded corpus, test perplexity (NELBO bound for the diffusion arms) printed beside the table of
Arriola et al. (2025). Checkpoints are cached: a second run only evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unmask.checkpoint import load_checkpoint, resolve_checkpoint
from unmask.config import Config, load_config, replace
from unmask.data import prepare_data
from unmask.decoding import preset_config
from unmask.metrics import Perplexity, evaluate_perplexity
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
                    max_rows: int = 0) -> Perplexity:
    loaded = load_checkpoint(run_dir)
    cfg = loaded.config
    data = prepare_data(cfg.data, loaded.tokenizer, splits=(split,))
    rows = data.rows[split][: max_rows or None]
    return evaluate_perplexity(loaded.model, rows, build_schedule(cfg.noise.schedule, cfg.noise.eps),
                               pad_id=loaded.tokenizer.pad_id,
                               byte_lengths=loaded.tokenizer.byte_lengths(), eps=cfg.noise.eps,
                               mc_samples=mc_samples, batch_size=cfg.eval.batch_size,
                               seed=cfg.eval.seed, precision="fp32")


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


def demo(*, steps: int = 600, out: str = "runs/demo-bd3lm", progress: bool = True) -> str:
    """The main job: tokenizer + token cache, a small BD3-LM trained on the embedded corpus, its
    validation perplexity and where the checkpoint is."""
    cfg = load_config("tiny-bd3lm")
    cfg = replace(cfg, train=replace(cfg.train, out=out, steps=steps, eval_every=200, save_every=200))
    train_or_reuse(cfg, progress=progress)
    val = heldout_perplexity(out, mc_samples=4, split="validation")
    ckpt = resolve_checkpoint(out)
    loaded = load_checkpoint(ckpt)
    decode = preset_config("bd3lm", max_new_tokens=96, steps=48)
    record = sample(loaded.model, loaded.tokenizer, ["def "], decode,
                    build_schedule(cfg.noise.schedule, cfg.noise.eps), seed=0)[0]
    return (f"BD3-LM (L'={cfg.model.block_size}, {cfg.model.n_layers} layers, dim {cfg.model.dim}) "
            f"trained {steps} steps on the embedded stdlib corpus\n"
            f"validation perplexity <= {val.ppl:.2f} (NELBO bound, {val.mc_samples} MC samples, "
            f"{val.rows} rows), {val.bits_per_byte:.3f} bits/byte\n"
            f"checkpoint: {ckpt}\n"
            f"a sample (preset bd3lm, {record['new_tokens']} tokens in {record['nfe']} model calls, "
            f"exact KV cache):\n---\n{record['prompt']}{record['text']}\n---\n"
            f"more: unmask sample --checkpoint {out} --preset bd3lm --prompt 'def ' --stream")
