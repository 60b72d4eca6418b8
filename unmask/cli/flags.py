"""Flag handling shared by the commands: config overrides (`--section.field=value`, parsed by `tyro`
against a config), the shorthands (`--data`, `--out`, `--preset`, `--max-new-tokens`), prompts.

Nothing heavy is imported at module level, so `unmask --help` stays quick."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from unmask.config import Config, DecodeConfig


def parse_overrides(default: Config, args: list[str], prog: str) -> Config:
    """Apply `--section.field=value` flags to `default`; unknown flags and bad values (including
    a ConfigError from validation) make tyro print the problem and exit 2."""
    import tyro

    return tyro.cli(Config, default=default, args=args, prog=prog, config=(tyro.conf.FlagConversionOff,))


SHORTHANDS = (
    "--data PATH     = --data.corpus PATH (stdlib, a .txt/.jsonl file or directory, hf:NAME)",
    "--out DIR       = --train.out DIR (the run directory)",
)


def shorthands(args: list[str]) -> list[str]:
    """`--data PATH` -> `--data.corpus PATH`, `--out DIR` -> `--train.out DIR` (also with `=`)."""
    out = []
    for a in args:
        for short, full in (("--data", "--data.corpus"), ("--out", "--train.out")):
            if a == short:
                a = full
            elif a.startswith(short + "="):
                a = full + a[len(short) :]
        out.append(a)
    return out


@dataclass(frozen=True)
class _DecodeFlags:
    decode: DecodeConfig


def _split_preset(rest: list[str]) -> tuple[str | None, list[str]]:
    """Pull `--preset NAME` (or `--decode.preset`) out of the flags: it sets the other defaults."""
    out, preset, it = [], None, iter(rest)
    for a in it:
        if a in ("--preset", "--decode.preset"):
            preset = next(it, None)
        elif a.startswith(("--preset=", "--decode.preset=")):
            preset = a.split("=", 1)[1]
        elif a == "--max-new-tokens":
            out.extend(["--decode.max_new_tokens", next(it, "")])
        elif a.startswith("--max-new-tokens="):
            out.append("--decode.max_new_tokens=" + a.split("=", 1)[1])
        else:
            out.append(a)
    return preset, out


def decode_config(
    rest: list[str], prog: str, *, preset: str | None = None, max_new_tokens: int | None = None
) -> DecodeConfig:
    """`--preset NAME` then `--decode.field=value` overrides (any preset field). `preset` and
    `max_new_tokens` are the values of those flags where a command declares them itself."""
    from unmask.decoding.presets import preset_config

    flag_preset, rest = _split_preset(rest)
    base = preset_config(preset or flag_preset or "mdlm")
    if max_new_tokens is not None:
        rest = [f"--decode.max_new_tokens={max_new_tokens}", *rest]
    import tyro

    return tyro.cli(
        _DecodeFlags, default=_DecodeFlags(base), args=rest, prog=prog, config=(tyro.conf.FlagConversionOff,)
    ).decode


def read_prompts(ns: argparse.Namespace) -> list[str]:
    from unmask.data.corpus import DataError, read_jsonl

    prompts = list(ns.prompt or [])
    if ns.prompts_file:
        path = Path(ns.prompts_file)
        if not path.is_file():
            raise DataError(f"--prompts-file: no such file {path}")
        if path.suffix == ".jsonl":
            prompts.extend(record["prompt"] for _, record in read_jsonl(path, "prompt"))
        else:
            prompts.extend(line for line in path.read_text().splitlines() if line.strip())
    return prompts or [""]  # no prompt: unconditional, from [BOS]


CHECKPOINT_HELP = (
    "run or checkpoint directory, or a pretrained Hugging Face directory (LLaDA, Dream, SDAR, ...)"
)


def add_model_flags(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--checkpoint plus what loading a pretrained directory needs: --tokenizer, --device, --dtype."""
    parser.add_argument("--checkpoint", required=required, help=CHECKPOINT_HELP)
    parser.add_argument(
        "--tokenizer", help="tokenizer directory for pretrained models that ship none (MDLM/BD3-LM)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights of a pretrained directory: auto = bf16 on GPUs (and CPUs with native bf16)",
    )


def load_model(ns: argparse.Namespace):
    """`load_checkpoint` with the flags of `add_model_flags`."""
    from unmask.models.checkpoint import load_checkpoint

    return load_checkpoint(
        ns.checkpoint,
        tokenizer=getattr(ns, "tokenizer", None),
        device=getattr(ns, "device", "cpu"),
        dtype=getattr(ns, "dtype", "auto"),
    )
