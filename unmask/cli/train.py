"""`unmask train`: pre-training, or continued training with `--init`."""

from __future__ import annotations

import argparse

from unmask.cli.flags import parse_overrides, shorthands
from unmask.config import Config
from unmask.config_io import load_config


def cmd_train(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.training.loop import train

    if ns.config:
        base = load_config(ns.config)
    elif ns.init:  # continued training: start from the init checkpoint's own configuration
        from unmask.models.checkpoint import load_checkpoint

        base = load_checkpoint(ns.init).config
    else:
        base = Config()
    cfg = parse_overrides(base, shorthands(rest), "unmask train")
    result = train(cfg, resume=ns.resume, init=ns.init)
    print(f"checkpoint: {result.run_dir} (step {result.step}, val ppl {result.val_ppl:.2f})")


def add_train_command(sub) -> None:
    t = sub.add_parser("train", allow_abbrev=False,
                       help="train a model; any --section.field=value overrides the config")
    t.add_argument("--config", help="TOML config file or shipped name (e.g. tiny-bd3lm)")
    t.add_argument("--resume", action="store_true", help="continue the run in --train.out")
    t.add_argument("--init", help="start from this checkpoint's weights and tokenizer")
    t.set_defaults(func=cmd_train)
