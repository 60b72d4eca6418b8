"""`unmask plot RUN... --out curves.png`: loss and validation curves of one or more runs."""

from __future__ import annotations

import argparse
import sys


def cmd_plot(ns: argparse.Namespace, rest: list[str]) -> None:
    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask plot`: {' '.join(rest)}")
    from unmask.evaluation.curves import plot_runs

    out = plot_runs(ns.runs, ns.out, smooth=ns.smooth)
    print(f"wrote {out}", file=sys.stderr)


def add_plot_command(sub) -> None:
    p = sub.add_parser("plot", allow_abbrev=False, help="draw runs' loss / validation curves to a PNG")
    p.add_argument("runs", nargs="+", help="run directories (each with its metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    p.add_argument("--smooth", type=int, default=1, help="running mean of the loss over this many steps")
    p.set_defaults(func=cmd_plot)
