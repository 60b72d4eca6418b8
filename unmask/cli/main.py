"""The `unmask` command: train, sample, eval, serve, export and the rest of the subcommands.

Subcommands: train | sample | eval | posttrain | repro | demo | bench | env | serve | export | plot.

Each subcommand wraps a public function. Config overrides are `--section.field=value` (or
`--section.field value`), parsed by `tyro` against the config loaded from `--config` (or a
checkpoint's own config). Building the parser imports no torch: `--help` answers at once, and a
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from unmask.cli.bench import add_bench_commands
from unmask.cli.env import add_env_command
from unmask.cli.eval import add_eval_commands
from unmask.cli.export import add_export_command
from unmask.cli.plot import add_plot_command
from unmask.cli.posttrain import add_posttrain_commands
from unmask.cli.repro import add_repro_commands
from unmask.cli.sample import add_sample_command
from unmask.cli.serve import add_serve_command
from unmask.cli.train import add_train_command


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user's input can cause: printed as one line, exit status 2, no traceback."""
    from unmask.config import ConfigError
    from unmask.data.corpus import DataError
    from unmask.data.tokenizer import TokenizerError
    from unmask.decoding.generate import DecodeError
    from unmask.evaluation.humaneval import HarnessError
    from unmask.evaluation.reference import ReferenceModelError
    from unmask.exporting.layouts import ExportError
    from unmask.models.checkpoint import CheckpointError
    from unmask.models.pretrained.families import PretrainedError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        TokenizerError,
        DecodeError,
        ReferenceModelError,
        HarnessError,
        PretrainedError,
        ExportError,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unmask", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    add_train_command(sub)
    add_eval_commands(sub)
    add_sample_command(sub)
    add_repro_commands(sub)
    add_posttrain_commands(sub)
    add_bench_commands(sub)
    add_env_command(sub)
    add_serve_command(sub)
    add_export_command(sub)
    add_plot_command(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ns, rest = build_parser().parse_known_args(argv)
    try:
        ns.func(ns, rest)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    except _interrupted() as e:  # a checkpoint of the last finished step was written
        again = ["unmask", *argv]
        if hasattr(ns, "resume"):  # `train`: continue with --resume; demo / repro reuse their runs
            again = [a for a in again if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
        print(f"{e}\nresume with: {shlex.join(again)}", file=sys.stderr)
        raise SystemExit(130 if e.signal_name == "SIGINT" else 143) from None
    except KeyboardInterrupt:  # Ctrl-C in any other command: one line, no traceback
        print(f"interrupted: unmask {ns.command} stopped (what it had finished is kept)", file=sys.stderr)
        raise SystemExit(130) from None
    except _write_failed() as e:  # disk full, read-only, I/O error: the partial output was removed
        from unmask.integrity import EXIT_WRITE_FAILED

        print(f"error: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(EXIT_WRITE_FAILED) from None


def _write_failed() -> type[Exception]:
    from unmask.integrity import WriteFailed

    return WriteFailed


def _interrupted() -> type[Exception]:
    from unmask.training.runs import TrainingInterrupted

    return TrainingInterrupted


if __name__ == "__main__":
    main()
