"""`unmask bench ...`: the benchmark subcommands (see BENCHMARKS.md), each wrapping a function of
`unmask.bench.training` or `unmask.bench.sampling` and writing JSON + markdown results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unmask.cli.flags import add_model_flags
from unmask.config_io import load_config


def cmd_bench_train(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.training import bench_train, bench_train_report
    from unmask.cli.flags import parse_overrides, shorthands

    cfg = parse_overrides(load_config(ns.config), shorthands(rest), "unmask bench train")
    result = bench_train(cfg, repeats=ns.repeats)
    print(bench_train_report(result))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)


def cmd_bench_data(ns: argparse.Namespace, rest: list[str]) -> None:
    import dataclasses

    from unmask.bench.data import bench_prepare, bench_rows, data_table, make_text, parse_size
    from unmask.cli.flags import parse_overrides, shorthands

    cfg = parse_overrides(load_config(ns.config), shorthands(rest), "unmask bench data")
    workdir = Path(ns.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [parse_size(s) for s in ns.sizes.split(",") if s.strip()]
    prepared = bench_prepare(cfg.data, sizes, workdir)
    rows = None
    if ns.train_steps:
        corpus = make_text(workdir / f"corpus-{sizes[0] >> 20}MB.txt", sizes[0])
        data = dataclasses.replace(
            cfg.data, corpus=str(corpus), cache_dir=str(workdir / f"cache-{sizes[0] >> 20}MB")
        )
        rows = bench_rows(dataclasses.replace(cfg, data=data), steps=ns.train_steps, repeats=ns.repeats)
    _write_bench(
        ns.out,
        "data",
        {"prepare": prepared, "train": rows, "config": cfg.data.__dict__},
        data_table(prepared, rows),
    )


def _bench_setup(ns):
    from unmask.cli.flags import load_model, read_prompts
    from unmask.data.prompts import file_prompts, heldout_prompts

    loaded = load_model(ns)
    if "pretrained" in loaded.state and not ns.prompts_file:
        raise SystemExit("error: a pretrained directory has no held-out split; pass --prompts-file")
    if ns.prompts_file:
        prompts = file_prompts(
            loaded.tokenizer,
            read_prompts(argparse.Namespace(prompt=None, prompts_file=ns.prompts_file)),
            ns.num_prompts,
        )
    else:
        prompts = heldout_prompts(loaded.tokenizer, loaded.config.data, ns.num_prompts, ns.prompt_tokens)
    return loaded, prompts


def _write_bench(out: str | None, name: str, result: dict, table: str) -> None:
    from unmask.bench.training import machine_info

    print(table)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps({"machine": machine_info(), **result}, indent=2))
        (folder / f"{name}.md").write_text(table + "\n")
        print(f"wrote {folder / name}.json and .md", file=sys.stderr)


def cmd_bench_sample(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.sampling import bench_sample, sample_table

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask bench sample`: {' '.join(rest)}")
    from unmask.bench.sampling import plot_sample_results
    from unmask.evaluation.reference import load_featurizer, load_reference

    loaded, prompts = _bench_setup(ns)
    reference = load_reference(ns.reference) if ns.reference else None
    featurizer = load_featurizer(ns.featurizer) if ns.featurizer else None
    mauve_texts = None
    if featurizer is not None:
        chars = 4 * ns.max_new_tokens  # about as long as the samples (a few characters per token)
        from unmask.data.corpus import text_pieces

        mauve_texts = text_pieces(
            ns.mauve_reference or f"{loaded.config.data.corpus}@test", len(prompts), chars, loaded.config.data
        )
    result = bench_sample(
        loaded.model,
        loaded.tokenizer,
        loaded.config,
        ns.presets.split(","),
        [int(s) for s in ns.steps.split(",")],
        prompts=prompts,
        max_new_tokens=ns.max_new_tokens,
        batch_size=ns.batch_size,
        seed=ns.seed,
        precision=ns.precision,
        reference=reference,
        featurizer=featurizer,
        mauve_texts=mauve_texts,
        min_samples=ns.min_samples,
    )
    settings = {k: v for k, v in vars(ns).items() if k != "func"}
    _write_bench(ns.out, "results", {"settings": settings, **result}, sample_table(result["rows"]))
    if ns.out:
        for path in plot_sample_results(result["rows"], ns.out):
            print(f"wrote {path}", file=sys.stderr)


def cmd_bench_cache(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.sampling import bench_cache

    loaded, prompts = _bench_setup(ns)
    r = bench_cache(
        loaded.model,
        loaded.tokenizer,
        loaded.config,
        prompts=prompts,
        max_new_tokens=ns.max_new_tokens,
        steps=ns.steps,
        batch_size=ns.batch_size,
        repeats=ns.repeats,
    )
    q = r["speedup"]
    table = (
        f"BD3-LM L'={r['block_size']}, {r['max_new_tokens']} new tokens, {r['steps']} steps, "
        f"batch {r['batch_size']}: exact cache {r['cached_seconds']:.2f}s vs recompute "
        f"{r['recompute_seconds']:.2f}s -> {q['median']:.2f}x (min {q['min']:.2f}, max {q['max']:.2f}, "
        f"{r['repeats']} interleaved pairs); identical tokens: {r['identical_tokens']}"
    )
    _write_bench(ns.out, "cache", r, table)


def cmd_bench_invariance(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.sampling import bench_invariance, invariance_table

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask bench invariance`: {' '.join(rest)}")
    loaded, prompts = _bench_setup(ns)
    r = bench_invariance(
        loaded.model,
        loaded.config,
        ns.presets.split(","),
        prompts=prompts,
        max_new_tokens=ns.max_new_tokens,
        steps=ns.steps,
        batch_size=ns.batch_size,
        repeats=ns.repeats,
        seed=ns.seed,
    )
    _write_bench(ns.out, "invariance", r, invariance_table(r))


def cmd_bench_llada(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.families import bench_llada_reference

    loaded, prompts = _bench_setup(ns)
    r = bench_llada_reference(
        loaded.model,
        loaded.config,
        prompts=prompts,
        max_new_tokens=ns.max_new_tokens,
        steps=ns.steps,
        block_len=ns.block_len,
        repeats=ns.repeats,
    )
    q = r["speedup"]
    table = (
        f"llada preset vs reference loop, {r['max_new_tokens']} new tokens, {r['steps']} steps, blocks "
        f"of {r['block_len']}, {r['rows']} rows: ours {r['ours_seconds']:.2f}s vs reference "
        f"{r['reference_seconds']:.2f}s -> {q['median']:.2f}x (min {q['min']:.2f}, max {q['max']:.2f}); "
        f"identical tokens: {r['identical_tokens']}"
    )
    _write_bench(ns.out, "llada_reference", r, table)


def cmd_bench_family(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.families import bench_family_reference, family_table

    loaded, prompts = _bench_setup(ns)
    try:
        r = bench_family_reference(
            loaded,
            prompts=prompts,
            max_new_tokens=ns.max_new_tokens,
            steps=ns.steps,
            block_len=ns.block_len,
            repeats=ns.repeats,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    _write_bench(ns.out, f"family_ref_{r['family']}", r, family_table(r))


def cmd_bench_lm_eval(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.harness import bench_lm_eval, lm_eval_table

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask bench lm-eval`: {' '.join(rest)}")
    items = ns.checkpoints.split(",")
    checkpoints = dict(item.split("=", 1) if "=" in item else (item, item) for item in items)
    tasks = {"loglikelihood": ns.mc_task, "generate_until": ns.gen_task, "loglikelihood_rolling": ns.ppl_task}
    result = bench_lm_eval(
        checkpoints,
        tasks,
        include_path=ns.include_path,
        limit=ns.limit or None,
        model_args=ns.model_args,
        mc_counts=tuple(int(m) for m in ns.mc.split(",")),
    )
    _write_bench(ns.out, "lm_eval", result, lm_eval_table(result))


def cmd_bench_serve(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.serve import bench_serve, mix_prompts, plot_serve, serve_table
    from unmask.models.checkpoint import load_checkpoint

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask bench serve`: {' '.join(rest)}")
    loaded = load_checkpoint(ns.checkpoint)
    if "pretrained" in loaded.state and not ns.prompts_file:
        raise SystemExit("error: a pretrained directory has no held-out split; pass --prompts-file")
    texts = None
    if ns.prompts_file:
        from unmask.cli.flags import read_prompts

        texts = read_prompts(argparse.Namespace(prompt=None, prompts_file=ns.prompts_file))
    try:
        prompts = mix_prompts(loaded, ns.mix, ns.num_prompts, ns.prompt_tokens, texts)
    except ValueError as e:
        raise SystemExit(f"error: --prompts-file {ns.prompts_file}: {e}") from e
    result = bench_serve(
        ns.checkpoint,
        prompts,
        clients=tuple(int(c) for c in ns.clients.split(",")),
        requests=ns.requests,
        max_tokens=ns.max_tokens,
        preset=ns.preset,
        steps=ns.steps or None,
        mix=ns.mix,
    )
    _write_bench(ns.out, f"serve_{ns.mix}" if ns.mix != "same" else "serve", result, serve_table(result))
    if ns.out:
        print(f"plot: {plot_serve(result, ns.out)}")


def cmd_bench_dist(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench.dist import bench_dist, dist_table

    result = bench_dist(ns.config, steps=ns.steps, nproc=ns.nproc, overrides=tuple(rest))
    _write_bench(ns.out, "dist", result, dist_table(result))


def add_bench_commands(sub) -> None:
    """`unmask bench train | data | sample | cache | invariance | llada-ref | family-ref | lm-eval | serve |
    dist`."""
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    bt = b.add_parser(
        "train",
        allow_abbrev=False,
        help="training speed: fp32 vs bf16, vectorized vs two-pass, vs matmul peak",
    )
    bt.add_argument("--config", default="small-bd3lm")
    bt.add_argument("--repeats", type=int, default=5, help="interleaved timed steps per arm")
    bt.add_argument("--json", help="also write the results to this JSON file")
    bt.set_defaults(func=cmd_bench_train)

    bd = b.add_parser(
        "data",
        allow_abbrev=False,
        help="corpus preparation at growing sizes (RSS, tokens/s); shards vs memory",
    )
    bd.add_argument("--config", default="small-bd3lm")
    bd.add_argument("--sizes", default="100MB,500MB,2GB", help="text corpora to generate and prepare")
    bd.add_argument("--workdir", required=True, help="folder for the generated corpora and their caches")
    bd.add_argument("--train-steps", type=int, default=10, help="steps per timed round (0: no training arm)")
    bd.add_argument("--repeats", type=int, default=3, help="interleaved rounds per training arm")
    bd.add_argument("--out", help="folder for the JSON and markdown results")
    bd.set_defaults(func=cmd_bench_data)

    def sampling_args(parser, max_new: int, steps) -> None:
        add_model_flags(parser)
        parser.add_argument("--num-prompts", type=int, default=8, help="held-out test-document prefixes")
        parser.add_argument("--prompts-file", help="JSONL with a `prompt` field instead of held-out prefixes")
        parser.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt (after [BOS])")
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--max-new-tokens", type=int, default=max_new)
        parser.add_argument("--steps", type=type(steps), default=steps)
        parser.add_argument("--out", help="folder for the JSON and markdown results")

    bs = b.add_parser("sample", allow_abbrev=False, help="presets x step budgets: speed beside quality")
    sampling_args(bs, 128, "32,128")
    bs.add_argument("--presets", default="mdlm,bd3lm,llada,fast-dllm,conv")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    bs.add_argument("--reference", help="AR checkpoint / HF causal LM for gen-PPL")
    bs.add_argument("--featurizer", help="MAUVE featurizer: minilm or ar:PATH (off when absent)")
    bs.add_argument("--mauve-reference", help="MAUVE reference texts (default: the corpus's test split)")
    bs.add_argument("--min-samples", type=int, default=100, help="MAUVE refuses below this many samples")
    bs.set_defaults(func=cmd_bench_sample)
    bc = b.add_parser("cache", allow_abbrev=False, help="BD3-LM exact KV cache vs full recompute")
    sampling_args(bc, 1024, 256)
    bc.add_argument("--repeats", type=int, default=3)
    bc.set_defaults(func=cmd_bench_cache)
    bi = b.add_parser(
        "invariance",
        allow_abbrev=False,
        help="batch/cache-invariant inference ops vs fused kernels: cost, rows that differ",
    )
    sampling_args(bi, 128, 64)
    bi.add_argument("--presets", default="mdlm,bd3lm,conv,llada")
    bi.add_argument("--seed", type=int, default=0)
    bi.add_argument("--repeats", type=int, default=3)
    bi.set_defaults(func=cmd_bench_invariance)
    bl = b.add_parser("llada-ref", allow_abbrev=False, help="llada preset vs a plain reference loop")
    sampling_args(bl, 128, 64)
    bl.add_argument("--block-len", type=int, default=32)
    bl.add_argument("--repeats", type=int, default=3)
    bl.set_defaults(func=cmd_bench_llada)
    bf = b.add_parser(
        "family-ref",
        allow_abbrev=False,
        help="a pretrained family's default preset vs its authors' own loop (llada, dream, sdar, llada2, "
        "fast-dllm-v2)",
    )
    sampling_args(bf, 64, 64)
    bf.add_argument("--block-len", type=int, default=32, help="LLaDA's semi-AR block")
    bf.add_argument("--repeats", type=int, default=3)
    bf.set_defaults(func=cmd_bench_family)
    be = b.add_parser(
        "lm-eval",
        allow_abbrev=False,
        help="lm-eval local tasks per checkpoint: metric and time per request type; MC error",
    )
    be.add_argument("--checkpoints", required=True, help="NAME=PATH,... (or PATH,...)")
    be.add_argument("--include-path", default="tests/evaluation/lm_eval_tasks", help="folder of task YAMLs")
    be.add_argument("--mc-task", default="unmask_mc")
    be.add_argument("--gen-task", default="unmask_gen")
    be.add_argument("--ppl-task", default="unmask_ppl")
    be.add_argument("--limit", type=int, default=0, help="documents per task (0 = all)")
    be.add_argument("--model-args", default="", help="extra model_args for every checkpoint")
    be.add_argument("--mc", default="1,4,16,64", help="Monte Carlo counts for the standard-error table")
    be.add_argument("--out", help="folder for the JSON and markdown results")
    be.set_defaults(func=cmd_bench_lm_eval)
    bv = b.add_parser(
        "serve", allow_abbrev=False, help="unmask serve: throughput/latency vs concurrent clients"
    )
    bv.add_argument("--checkpoint", required=True)
    bv.add_argument("--clients", default="1,4,16,64")
    bv.add_argument("--requests", type=int, default=64, help="requests at each concurrency")
    bv.add_argument("--max-tokens", type=int, default=64)
    bv.add_argument("--preset", default="bd3lm")
    bv.add_argument("--steps", type=int, default=0, help="decoding steps (default: the preset's)")
    bv.add_argument("--num-prompts", type=int, default=8, help="held-out prefixes in the request mix")
    bv.add_argument(
        "--mix",
        default="same",
        choices=["same", "lengths", "mixed"],
        help="traffic: one prompt length; lengths 5-150 tokens; lengths and per-request presets / steps",
    )
    bv.add_argument("--prompt-tokens", type=int, default=16)
    bv.add_argument("--prompts-file", help="prompts (one per line or JSONL) instead of held-out text "
                    "(a pretrained directory has none): their tokens, cut to the mix's lengths")  # fmt: skip
    bv.add_argument("--out", help="folder for the JSON, markdown and plot")
    bv.set_defaults(func=cmd_bench_serve)
    bd = b.add_parser(
        "dist",
        allow_abbrev=False,
        help="1 process vs N with DDP / FSDP: s/step and memory per rank; + config overrides",
    )
    bd.add_argument("--config", default="tiny-bd3lm")
    bd.add_argument("--steps", type=int, default=20)
    bd.add_argument("--nproc", type=int, default=2)
    bd.add_argument("--out", help="folder for the JSON and markdown results")
    bd.set_defaults(func=cmd_bench_dist)
