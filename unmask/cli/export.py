"""`unmask export`: a trained run as a Hugging Face directory in a pretrained family's layout."""

from __future__ import annotations

import argparse
import sys

FORMAT_NAMES = ("auto", "llada", "sdar", "llada2", "llama", "qwen3")  # unmask.export.FORMATS, torch-free


def cmd_export(ns: argparse.Namespace, rest: list[str]) -> None:
    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask export`: {' '.join(rest)}")
    from unmask.exporting import export
    from unmask.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(ns.checkpoint, prefer_ema=not ns.raw)
    out = export(
        loaded,
        ns.out,
        format=ns.format,
        dtype=ns.dtype,
        max_shard_bytes=int(ns.max_shard_gb * 2**30),
        overwrite=ns.overwrite,
    )
    print(f"wrote {out} (load it with: unmask sample --checkpoint {out})", file=sys.stderr)


def add_export_command(sub) -> None:
    s = sub.add_parser(
        "export",
        allow_abbrev=False,
        help="write a trained run as a Hugging Face directory (LLaDA / SDAR / LLaDA2 / Llama / Qwen3 layout)",
    )
    s.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    s.add_argument("--out", required=True, help="the directory to write")
    s.add_argument(
        "--format",
        choices=FORMAT_NAMES,
        default="auto",
        help="auto: llada (bidirectional), sdar (block-causal with --model.qk_norm) or llada2 (without), "
        "qwen3 / llama (AR with / without q/k norm)",
    )
    s.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16", help="weights' dtype")
    s.add_argument("--max-shard-gb", type=float, default=5.0, help="shard the weights above this size")
    s.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=cmd_export)
