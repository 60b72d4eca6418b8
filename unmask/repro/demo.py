"""`unmask demo` (the main job): a small BD3-LM and an AR reference trained on the embedded corpus,
its perplexity, a sample, and a table of decoders (speed beside gen-PPL / MAUVE / rep-4)."""

from __future__ import annotations

from unmask.config import replace
from unmask.config_io import load_config
from unmask.data.corpus import text_pieces
from unmask.decoding.presets import preset_config
from unmask.decoding.sample import sample
from unmask.evaluation.perplexity import heldout_perplexity
from unmask.evaluation.reference import load_reference
from unmask.models.checkpoint import load_checkpoint, resolve_checkpoint
from unmask.repro.common import default_featurizer, train_or_reuse
from unmask.schedules import build_schedule

DEMO_PRESETS = ("bd3lm", "llada", "fast-dllm", "conv")


def demo(
    *,
    steps: int = 600,
    out: str = "runs/demo-bd3lm",
    ar_out: str = "runs/demo-ar",
    samples: int = 64,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> str:
    """The main job: tokenizer + token cache, a small BD3-LM (and an AR reference model) trained on
    the embedded corpus, the BD3-LM's validation perplexity, a sample, and a table of decoding
    presets: speed beside gen-PPL, MAUVE and repetition of the same samples."""
    from unmask.bench.sampling import bench_sample, sample_table
    from unmask.data.prompts import heldout_prompts

    cfg = load_config("tiny-bd3lm")
    cfg = replace(cfg, train=replace(cfg.train, out=out, steps=steps, eval_every=200, save_every=200))
    train_or_reuse(cfg, progress=progress)
    ar_cfg = load_config("tiny-ar")
    ar_cfg = replace(
        ar_cfg, train=replace(ar_cfg.train, out=ar_out, steps=steps, eval_every=200, save_every=200)
    )
    train_or_reuse(ar_cfg, progress=progress)  # the gen-PPL / MAUVE reference
    val = heldout_perplexity(out, split="validation")
    ckpt = resolve_checkpoint(out)
    loaded = load_checkpoint(ckpt)
    schedule = build_schedule(cfg.noise.schedule, cfg.noise.eps)
    record = sample(
        loaded.model, loaded.tokenizer, ["def "], preset_config("bd3lm", max_new_tokens=96), schedule, seed=0
    )[0]
    prompts = heldout_prompts(loaded.tokenizer, cfg.data, samples, 16)
    heldout = text_pieces(f"{cfg.data.corpus}@test", samples, 4 * max_new_tokens, cfg.data)
    result = bench_sample(
        loaded.model,
        loaded.tokenizer,
        cfg,
        list(DEMO_PRESETS),
        [max_new_tokens // 2],
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        batch_size=16,
        reference=load_reference(ar_out),
        featurizer=default_featurizer(ar_out),
        mauve_texts=heldout,
        min_samples=samples,
        progress=progress,
    )
    return (
        f"BD3-LM (L'={cfg.model.block_size}, {cfg.model.n_layers} layers, dim {cfg.model.dim}) "
        f"trained {steps} steps on the embedded stdlib corpus\n"
        f"validation perplexity <= {val.ppl:.2f} (NELBO bound, {val.mc_samples} MC samples, "
        f"{val.rows} rows), {val.bits_per_byte:.3f} bits/byte\n"
        f"checkpoint: {ckpt}\n"
        f"a sample (preset bd3lm, {record['new_tokens']} tokens in {record['nfe']} model calls, "
        f"exact KV cache):\n---\n{record['prompt']}{record['text']}\n---\n\n"
        f"decoding presets on {samples} held-out prompts, {max_new_tokens} new tokens, "
        f"{max_new_tokens // 2} steps; gen-PPL under {ar_out}; MAUVE ({result['featurizer']}) vs "
        f"{len(heldout)} held-out pieces:\n{sample_table(result['rows'])}\n\n"
        f"more: unmask sample --checkpoint {out} --preset conv --prompt 'def ' --stream"
    )
