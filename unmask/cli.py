"""The `unmask` command: train | eval | repro | bench | demo. Each subcommand wraps a public function.

Config overrides are `--section.field=value` (or `--section.field value`), parsed by `tyro`
against the config loaded from `--config` (or a checkpoint's own config).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import tyro

from unmask.checkpoint import CheckpointError
from unmask.config import Config, ConfigError, load_config
from unmask.data import DataError
from unmask.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError)


def parse_overrides(default: Config, args: list[str], prog: str) -> Config:
    """Apply `--section.field=value` flags to `default`; unknown flags and bad values (including
    a ConfigError from validation) make tyro print the problem and exit 2."""
    return tyro.cli(Config, default=default, args=args, prog=prog,
                    config=(tyro.conf.FlagConversionOff,))


def _shorthands(args: list[str]) -> list[str]:
    """`--data PATH` -> `--data.corpus PATH`, `--out DIR` -> `--train.out DIR` (also with `=`)."""
    out = []
    for a in args:
        for short, full in (("--data", "--data.corpus"), ("--out", "--train.out")):
            if a == short:
                a = full
            elif a.startswith(short + "="):
                a = full + a[len(short):]
        out.append(a)
    return out


def cmd_train(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.train import train

    base = load_config(ns.config) if ns.config else Config()
    cfg = parse_overrides(base, _shorthands(rest), "unmask train")
    result = train(cfg, resume=ns.resume, init=ns.init)
    print(f"checkpoint: {result.run_dir} (step {result.step}, val ppl {result.val_ppl:.2f})")


def cmd_eval_ppl(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro import heldout_perplexity

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask eval ppl`: {' '.join(rest)}")
    ppl = heldout_perplexity(ns.checkpoint, mc_samples=ns.mc_samples, split=ns.split,
                             max_rows=ns.max_rows)
    if ns.json:
        print(json.dumps(asdict(ppl)))
        return
    kind = f"NELBO bound, {ppl.mc_samples} MC samples" if ppl.bound else "exact"
    print(f"{ns.split} perplexity {'<= ' if ppl.bound else ''}{ppl.ppl:.3f} ({kind}); "
          f"{ppl.nats_per_token:.4f} nats/token, {ppl.bits_per_byte:.4f} bits/byte; "
          f"{ppl.rows} rows, {ppl.tokens} tokens")


def cmd_repro(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro import bd3lm_table, repro_bd3lm

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask repro`: {' '.join(rest)}")
    results = repro_bd3lm(steps=ns.steps, out=ns.out, mc_samples=ns.mc_samples)
    print(bd3lm_table(results))


def cmd_demo(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro import demo

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask demo`: {' '.join(rest)}")
    print(demo(steps=ns.steps, out=ns.out))


def cmd_bench_train(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.bench import bench_train, bench_train_report

    cfg = parse_overrides(load_config(ns.config), _shorthands(rest), "unmask bench train")
    result = bench_train(cfg, repeats=ns.repeats)
    print(bench_train_report(result))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unmask", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", allow_abbrev=False,
                       help="train a model; any --section.field=value overrides the config")
    t.add_argument("--config", help="TOML config file or shipped name (e.g. tiny-bd3lm)")
    t.add_argument("--resume", action="store_true", help="continue the run in --train.out")
    t.add_argument("--init", help="start from this checkpoint's weights and tokenizer")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="what", required=True)
    ep = e.add_parser("ppl", allow_abbrev=False, help="perplexity (NELBO bound for diffusion models)")
    ep.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    ep.add_argument("--split", default="test", choices=["validation", "test"])
    ep.add_argument("--mc-samples", type=int, default=8, help="Monte Carlo time samples per row")
    ep.add_argument("--max-rows", type=int, default=0, help="evaluate at most this many rows")
    ep.add_argument("--json", action="store_true", help="print the result as JSON")
    ep.set_defaults(func=cmd_eval_ppl)

    r = sub.add_parser("repro", help="small-scale reproductions").add_subparsers(dest="what", required=True)
    rb = r.add_parser("bd3lm", allow_abbrev=False, help="AR vs MDLM vs BD3-LM L'=16/8/4 test PPL")
    rb.add_argument("--steps", type=int, default=None, help="training steps per arm (same for all)")
    rb.add_argument("--out", default="runs/repro-bd3lm", help="where the arms' runs are cached")
    rb.add_argument("--mc-samples", type=int, default=8)
    rb.set_defaults(func=cmd_repro)

    d = sub.add_parser("demo", allow_abbrev=False, help="train a small BD3-LM on the embedded corpus")
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--out", default="runs/demo-bd3lm")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    bt = b.add_parser("train", allow_abbrev=False,
                      help="training speed: fp32 vs bf16, vectorized vs two-pass, vs matmul peak")
    bt.add_argument("--config", default="small-bd3lm")
    bt.add_argument("--repeats", type=int, default=5, help="interleaved timed steps per arm")
    bt.add_argument("--json", help="also write the results to this JSON file")
    bt.set_defaults(func=cmd_bench_train)
    return p


def main(argv: list[str] | None = None) -> None:
    ns, rest = build_parser().parse_known_args(argv)
    try:
        ns.func(ns, rest)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
