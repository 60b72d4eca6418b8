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

    return tyro.cli(
        Config, default=default, args=split_tuples(args), prog=prog, config=(tyro.conf.FlagConversionOff,)
    )


def _tuple_flags() -> set[str]:
    """`--section.field` of every config field whose value is a tuple (`--noise.clip`, ...)."""
    from dataclasses import fields

    cfg = Config()
    return {
        f"--{sec.name}.{f.name}"
        for sec in fields(cfg)
        for f in fields(getattr(cfg, sec.name))
        if isinstance(getattr(getattr(cfg, sec.name), f.name), tuple)
    }


def split_tuples(args: list[str]) -> list[str]:
    """The comma form of tuple flags as the space-separated one tyro reads: `--noise.clip=0.2,0.8`
    and `--lora.targets q_proj,v_proj` become `--noise.clip 0.2 0.8`, `--lora.targets q_proj v_proj`."""
    tuples, out, i = _tuple_flags(), [], 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=")
        if flag in tuples and eq:
            out += [flag, *[v for v in value.split(",") if v]]
        elif a in tuples and i + 1 < len(args) and "," in args[i + 1] and not args[i + 1].startswith("--"):
            out += [a, *[v for v in args[i + 1].split(",") if v]]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


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
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:1, ..."
    )
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
        device=resolve_device(getattr(ns, "device", "auto")),
        dtype=getattr(ns, "dtype", "auto"),
    )


def resolve_device(device: str | None) -> str:
    """`auto` (or nothing): cuda when this torch sees a GPU, else cpu."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
