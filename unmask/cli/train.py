"""`unmask train`: pre-training, or continued training with `--init`."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Iterator

from unmask.cli.flags import SHORTHANDS, parse_overrides, shorthands
from unmask.cli.help import config_help
from unmask.config import Config, replace
from unmask.config_io import load_config

_RANK_PREFIX = re.compile(r"^\[(?:default)?rank\d+\]:\s?")
# what a surviving rank raises when another rank died mid-collective: the consequence, not the cause
_PEER_LOSS = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
              "communicator was aborted", "Broken pipe")  # fmt: skip


def _lost_a_peer(exception_line: str) -> bool:
    return any(s in exception_line for s in _PEER_LOSS)


def shown_stderr(lines: Iterable[str]) -> Iterator[str]:
    """torchrun's stderr as the user sees it: every line, less torchrun's own failure report
    (summarised in one line by `launch`) and the tracebacks of ranks that only lost a dead peer."""
    held: list[str] = []  # a traceback being printed: shown once its exception line is known
    for line in lines:
        body = _RANK_PREFIX.sub("", line, count=1)  # torchrun prefixes a worker's lines: "[rank0]: "
        if held or body.startswith("Traceback (most recent call last):"):
            held.append(line)
            if body[:1] not in (" ", "T"):  # the exception line closes the traceback
                if "ChildFailedError" in body:  # torchrun's failure table follows: all of it dropped
                    return
                if not _lost_a_peer(body):
                    yield from held
                held = []
            continue
        yield line
    yield from held


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
    import shlex

    from unmask.training.distributed import die_with_parent

    # torchrun dies with this process (kill -9 of `unmask train --nproc` leaves no workers)
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent, stderr=subprocess.PIPE, text=True, bufsize=1)
    tail: list[str] = []

    def kept(lines):  # every line, the end kept to name a dead rank
        nonlocal tail
        for line in lines:
            tail = (tail + [line])[-200:]
            yield line

    lines = kept(proc.stderr)
    sys.stderr.writelines(shown_stderr(lines))  # passed through as it comes
    for _ in lines:  # torchrun's failure report: read (its root cause names the rank), not shown
        pass
    code = proc.wait()
    if code != 0:
        text = "".join(tail)
        cause = text.split("Root Cause", 1)[-1]  # torchrun's first observed failure
        rank = re.search(r"\brank\s*:\s*(\d+)", cause)
        exit_code = re.search(r"exitcode\s*:\s*(-?\d+)", cause)
        why = re.search(r"traceback\s*:\s*(.+)", cause)
        again = ["unmask", "train", *argv[1:]]
        again = [a for a in again if a != "--overwrite"] + ([] if "--resume" in again else ["--resume"])
        print(
            f"error: training rank {rank.group(1) if rank else '?'} died (exit code "
            f"{exit_code.group(1) if exit_code else code}"
            f"{': ' + why.group(1).strip() if why else ''}); the last complete checkpoint is intact; "
            f"resume with: {shlex.join([*again, '--nproc', str(nproc)])}",
            file=sys.stderr,
        )
    raise SystemExit(code)


def cmd_train(ns: argparse.Namespace, rest: list[str]) -> None:
    cfg = run_config(ns, rest)
    if ns.nproc > 1:  # the same command, without --nproc, under torchrun
        from unmask.training.distributed import check_world

        strategy = cfg.dist.strategy if any(a.startswith("--dist.strategy") for a in rest) else "ddp"
        check_world(strategy, cfg.train.batch_size, ns.nproc)  # before any process starts
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

    result = train(cfg, resume=ns.resume, init=ns.init, overwrite=ns.overwrite)
    if os.environ.get("RANK", "0") == "0":
        ppl = f"{result.val_ppl:.2f}" if result.val_ppl is not None else "not measured"
        print(f"checkpoint: {result.run_dir} (step {result.step}, val ppl {ppl})")


def run_config(ns: argparse.Namespace, rest: list[str]) -> Config:
    """The run's config: `--config`, a resumed run's own saved one, or `--init`'s; flags on top."""
    if ns.config:
        base = load_config(ns.config)
    elif ns.resume:  # continue a run: its own saved config, with the flags given now on top
        from pathlib import Path

        from unmask.config_io import config_from_json
        from unmask.models.checkpoint import complete_checkpoints

        out = parse_overrides(Config(), shorthands(rest), "unmask train").train.out
        done = complete_checkpoints(Path(out)) if Path(out).is_dir() else []
        # no complete checkpoint yet (killed before the first one): a fresh start from the flags
        base = config_from_json((done[-1] / "config.json").read_text()) if done else Config()
        cfg = parse_overrides(base, shorthands(rest), "unmask train")
        return cfg if cfg.train.out == out else replace(cfg, train=replace(cfg.train, out=out))
    elif ns.init:  # continued training: start from the init checkpoint's own configuration
        from unmask.config_io import config_from_json
        from unmask.models.checkpoint import resolve_checkpoint
        from unmask.models.pretrained.load import is_pretrained_dir, pretrained_config

        if is_pretrained_dir(ns.init):
            base = pretrained_config(ns.init)
        else:  # its config alone (the weights are read once, by train)
            base = config_from_json((resolve_checkpoint(ns.init) / "config.json").read_text())
    else:
        base = Config()
    return parse_overrides(base, shorthands(rest), "unmask train")


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
