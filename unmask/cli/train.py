"""`unmask train`: pre-training, or continued training with `--init`."""

from __future__ import annotations

import argparse
import os
import sys

from unmask.cli.flags import SHORTHANDS, parse_overrides, shorthands
from unmask.cli.help import config_help
from unmask.config import Config
from unmask.config_io import load_config


def launch(nproc: int, argv: list[str]) -> None:
    """`--nproc N`: run this same command under torchrun on N local processes (ddp unless
    --dist.strategy says otherwise); exits with torchrun's status."""
    import subprocess

    if not any(a.startswith("--dist.strategy") for a in argv):
        argv = [*argv, "--dist.strategy", "ddp"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "unmask",
        *argv,
    ]
    raise SystemExit(subprocess.run(cmd).returncode)


def cmd_train(ns: argparse.Namespace, rest: list[str]) -> None:
    if ns.nproc > 1:  # the same command, without --nproc, under torchrun
        launch(
            ns.nproc,
            [
                "train",
                *(["--config", ns.config] if ns.config else []),
                *(["--init", ns.init] if ns.init else []),
                *(["--resume"] if ns.resume else []),
                *(["--overwrite"] if ns.overwrite else []),
                *rest,
            ],
        )
    from unmask.training.loop import train

    if ns.config:
        base = load_config(ns.config)
    elif ns.resume:  # continue a run: its own saved config, with the flags given now on top
        from unmask.config_io import config_from_json
        from unmask.models.checkpoint import resolve_checkpoint

        out = parse_overrides(Config(), shorthands(rest), "unmask train").train.out
        base = config_from_json((resolve_checkpoint(out) / "config.json").read_text())
    elif ns.init:  # continued training: start from the init checkpoint's own configuration
        from unmask.models.checkpoint import load_checkpoint

        base = load_checkpoint(ns.init).config
    else:
        base = Config()
    cfg = parse_overrides(base, shorthands(rest), "unmask train")
    result = train(cfg, resume=ns.resume, init=ns.init, overwrite=ns.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {result.run_dir} (step {result.step}, val ppl {result.val_ppl:.2f})")


def add_train_command(sub) -> None:
    t = sub.add_parser(
        "train",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a model; any --section.field=value overrides the config",
        epilog=config_help(shorthands=SHORTHANDS),
    )
    t.add_argument("--config", help="TOML config file or shipped name (e.g. tiny-bd3lm)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (with its saved config unless --config is given)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine: relaunches itself under torchrun (--dist.strategy ddp)",
    )
    t.add_argument("--init", help="start from this checkpoint's weights and tokenizer")
    t.set_defaults(func=cmd_train)
