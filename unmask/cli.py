"""The `unmask` command: train | eval | repro | bench | demo. Each subcommand wraps a public function.

Config overrides are `--section.field=value` (or `--section.field value`), parsed by `tyro`
against the config loaded from `--config` (or a checkpoint's own config).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from unmask.checkpoint import CheckpointError
from unmask.cli_bench import add_bench_commands
from unmask.cli_eval import add_eval_commands
from unmask.config import Config, ConfigError, DecodeConfig
from unmask.config_io import load_config
from unmask.data import DataError, read_jsonl
from unmask.generate import DecodeError
from unmask.humaneval import HarnessError
from unmask.reference import ReferenceModelError
from unmask.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, DecodeError, ReferenceModelError,
               HarnessError)


def parse_overrides(default: Config, args: list[str], prog: str) -> Config:
    """Apply `--section.field=value` flags to `default`; unknown flags and bad values (including
    a ConfigError from validation) make tyro print the problem and exit 2."""
    return tyro.cli(Config, default=default, args=args, prog=prog,
                    config=(tyro.conf.FlagConversionOff,))


def shorthands(args: list[str]) -> list[str]:
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

    if ns.config:
        base = load_config(ns.config)
    elif ns.init:  # continued training: start from the init checkpoint's own configuration
        from unmask.checkpoint import load_checkpoint

        base = load_checkpoint(ns.init).config
    else:
        base = Config()
    cfg = parse_overrides(base, shorthands(rest), "unmask train")
    result = train(cfg, resume=ns.resume, init=ns.init)
    print(f"checkpoint: {result.run_dir} (step {result.step}, val ppl {result.val_ppl:.2f})")


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


def decode_config(rest: list[str], prog: str) -> DecodeConfig:
    """`--preset NAME` then `--decode.field=value` overrides (any preset field)."""
    from unmask.decoding import preset_config

    preset, rest = _split_preset(rest)
    base = preset_config(preset or "mdlm")
    return tyro.cli(_DecodeFlags, default=_DecodeFlags(base), args=rest, prog=prog,
                    config=(tyro.conf.FlagConversionOff,)).decode


def read_prompts(ns: argparse.Namespace) -> list[str]:
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


def cmd_sample(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.checkpoint import load_checkpoint
    from unmask.sample import render, sample
    from unmask.schedules import build_schedule

    cfg = decode_config(rest, "unmask sample")
    loaded = load_checkpoint(ns.checkpoint)
    model, tok = loaded.model, loaded.tokenizer
    sampler = None
    if ns.sampler:
        from unmask.posttrain import load_sampler

        sampler = load_sampler(ns.sampler, ns.checkpoint)[0]
    if ns.compile:
        model.compile_blocks()
    max_len = ns.max_len or (loaded.config.data.seq_len if model.cfg.attention == "bidirectional" else None)
    prompts = read_prompts(ns)
    on_state = None
    live = None
    if ns.stream:
        from rich.console import Console
        from rich.live import Live
        from rich.panel import Panel

        live = Live(console=Console(stderr=True), refresh_per_second=20, transient=False)
        live.start()

        def on_state(state):
            live.update(Panel(render(state, tok), title=f"block {state.block} step {state.step} "
                                                       f"nfe {state.nfe}"))
    try:
        records = sample(model, tok, prompts, cfg, build_schedule(loaded.config.noise.schedule,
                                                                   loaded.config.noise.eps),
                         num_samples=ns.num_samples, batch_size=ns.batch_size, seed=ns.seed,
                         max_len=max_len, precision=ns.precision, on_state=on_state, sampler=sampler)
    finally:
        if live is not None:
            live.stop()
    if ns.output:
        with open(ns.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"wrote {len(records)} samples to {ns.output}", file=sys.stderr)
    else:
        for r in records:
            print(f"--- sample {r['index']} (nfe {r['nfe']}, {r['new_tokens']} tokens)")
            print(r["prompt"] + r["text"])


def cmd_posttrain_instruct(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.posttrain import instruct_config
    from unmask.train import train

    base = instruct_config(ns.checkpoint, ns.what, out=ns.out, data=ns.data, template=ns.template)
    cfg = parse_overrides(base, rest, f"unmask posttrain {ns.what}")
    result = train(cfg, init=ns.checkpoint, resume=ns.resume)
    print(f"checkpoint: {result.run_dir} (step {result.step}, response-only val ppl <= {result.val_ppl:.2f})")


def cmd_posttrain_adjust_data(ns: argparse.Namespace, rest: list[str]) -> None:
    import torch

    from unmask.bench_sampling import heldout_prompts
    from unmask.checkpoint import load_checkpoint
    from unmask.posttrain import generate_trajectories

    loaded = load_checkpoint(ns.checkpoint)
    if ns.prompt_tokens:
        prompts = heldout_prompts(loaded.tokenizer, loaded.config.data, ns.num_trajectories, ns.prompt_tokens,
                                  split="train")
    else:  # unconditional: from [BOS]
        prompts = torch.full((ns.num_trajectories, 1), loaded.tokenizer.bos_id)
    new = ns.new_tokens or loaded.config.data.seq_len - prompts.shape[1]
    traj = generate_trajectories(loaded.model, prompts, ns.out, new_tokens=new, batch_size=ns.batch_size,
                                 seed=ns.seed)
    print(f"{len(traj.prompts)} trajectories of {new} tokens in {ns.out}")


def cmd_posttrain_adjust(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.checkpoint import load_checkpoint
    from unmask.posttrain import load_trajectories, split_trajectories, train_sampler

    loaded = load_checkpoint(ns.checkpoint)
    traj, valid = split_trajectories(load_trajectories(ns.trajectories), ns.valid_fraction)
    r = train_sampler(loaded.model, ns.checkpoint, traj, valid, K=ns.k, out=ns.out, steps=ns.steps,
                      batch_size=ns.batch_size, lr=ns.lr)
    print(f"sampler ({r['params']:,} parameters, {100 * r['params'] / r['base_params']:.1f}% of the base) "
          f"in {ns.out}; validation KL {r['history'][0]['val_kl']:.4f} -> {r['history'][-1]['val_kl']:.4f}")


def cmd_repro_adjust(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro import adjust_table, repro_adjust

    print(adjust_table(repro_adjust(out=ns.out, trajectories=ns.trajectories, samples=ns.samples,
                                    steps=ns.steps)))


def cmd_repro_r2ft(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro_r2ft import r2ft_table, repro_r2ft

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask repro r2ft`: {' '.join(rest)}")
    print(r2ft_table(repro_r2ft(out=ns.out, sft_steps=ns.sft_steps, r2ft_steps=ns.r2ft_steps,
                                canvas=ns.canvas, samples=ns.samples, kernel=ns.kernel,
                                humaneval=not ns.no_humaneval, eos=ns.eos)))


def cmd_repro_soft_mask(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro import repro_soft_mask, soft_mask_table

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask repro soft-mask`: {' '.join(rest)}")
    print(soft_mask_table(repro_soft_mask(out=ns.out, steps=ns.steps, samples=ns.samples)))


def cmd_repro(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro import (
        bd3lm_table,
        repro_bd3lm,
        repro_bd3lm_sampling,
        sampling_table,
    )

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask repro`: {' '.join(rest)}")
    results = repro_bd3lm(steps=ns.steps, out=ns.out, mc_samples=ns.mc_samples)
    print(bd3lm_table(results))
    if ns.samples:
        print()
        print(sampling_table(repro_bd3lm_sampling(out=ns.out, num_samples=ns.samples)))


def cmd_demo(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro import demo

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask demo`: {' '.join(rest)}")
    print(demo(steps=ns.steps, out=ns.out))


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

    add_eval_commands(sub)

    s = sub.add_parser("sample", allow_abbrev=False,
                       help="decode text; --preset NAME then any --decode.field=value")
    s.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    s.add_argument("--prompt", action="append", help="a prompt (repeatable); none = unconditional")
    s.add_argument("--prompts-file", help="prompts: one per line, or .jsonl with a `prompt` field")
    s.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--max-len", type=int, default=0,
                   help="longest canvas allowed (default: training length for bidirectional models)")
    s.add_argument("--stream", action="store_true", help="show the canvas filling in")
    s.add_argument("--compile", action="store_true", help="torch.compile the model's blocks first")
    s.add_argument("--sampler", help="ADJUST sampler directory (with --preset adjust)")
    s.add_argument("--output", help="write JSONL records here instead of printing text")
    s.set_defaults(func=cmd_sample)

    r = sub.add_parser("repro", help="small-scale reproductions").add_subparsers(dest="what", required=True)
    rb = r.add_parser("bd3lm", allow_abbrev=False, help="AR vs MDLM vs BD3-LM L'=16/8/4 test PPL")
    rb.add_argument("--steps", type=int, default=None, help="training steps per arm (same for all)")
    rb.add_argument("--out", default="runs/repro-bd3lm", help="where the arms' runs are cached")
    rb.add_argument("--mc-samples", type=int, default=8)
    rb.add_argument("--samples", type=int, default=128,
                    help="unconditional samples per arm for the sampling comparison (0 skips it)")
    rb.set_defaults(func=cmd_repro)
    rs = r.add_parser("soft-mask", allow_abbrev=False, help="binary vs soft-masked continued training")
    rs.add_argument("--steps", type=int, default=500, help="continued-training updates (iso-update)")
    rs.add_argument("--samples", type=int, default=128, help="held-out prompts for the sample metrics")
    rs.add_argument("--out", default="runs/repro-soft-mask")
    rs.set_defaults(func=cmd_repro_soft_mask)
    ra = r.add_parser("adjust", allow_abbrev=False, help="exact vs marginal vs ADJUST, MAUVE vs exact")
    ra.add_argument("--trajectories", type=int, default=512)
    ra.add_argument("--samples", type=int, default=256)
    ra.add_argument("--steps", type=int, default=400, help="sampler training steps per K")
    ra.add_argument("--out", default="runs/repro-adjust")
    ra.set_defaults(func=cmd_repro_adjust)

    rr = r.add_parser("r2ft", allow_abbrev=False,
                      help="{SFT, SFT+R2FT} x {llada, semi-ar, topk-glob, conv} on stdlib-functions")
    rr.add_argument("--sft-steps", type=int, default=800)
    rr.add_argument("--r2ft-steps", type=int, default=300)
    rr.add_argument("--canvas", type=int, default=256, help="new tokens per prompt (steps = canvas / 8)")
    rr.add_argument("--samples", type=int, default=128, help="held-out prompts")
    rr.add_argument("--kernel", type=int, default=65, help="Conv window (the paper uses about L/4)")
    rr.add_argument("--no-humaneval", action="store_true", help="skip HumanEval pass@1")
    rr.add_argument("--eos", choices=["all", "first"], default="all", help="SFT row tail (--instruct.eos)")
    rr.add_argument("--out", default="runs/repro-r2ft")
    rr.set_defaults(func=cmd_repro_r2ft)

    pt = sub.add_parser("posttrain", help="post-training").add_subparsers(dest="what", required=True)
    for stage, text in (("sft", "instruction SFT: diffusion loss on response tokens only"),
                        ("r2ft", "rejective fine-tuning against rule-made repetition negatives")):
        pi = pt.add_parser(stage, allow_abbrev=False, help=text + "; any --section.field=value")
        pi.add_argument("--checkpoint", required=True, help="the model to post-train (run or checkpoint dir)")
        pi.add_argument("--out", required=True, help="run directory of the new model")
        pi.add_argument("--data", help="pairs: stdlib-functions, Alpaca .json/.jsonl, chat .jsonl, hf:NAME "
                                       "(default: the checkpoint's --instruct.data)")
        pi.add_argument("--template", help="prompt template (alpaca, plain, chat, code; default auto)")
        pi.add_argument("--resume", action="store_true", help="continue the run in --out")
        pi.set_defaults(func=cmd_posttrain_instruct)
    pd = pt.add_parser("adjust-data", allow_abbrev=False, help="exact one-token-per-forward trajectories")
    pd.add_argument("--checkpoint", required=True)
    pd.add_argument("--num-trajectories", type=int, default=512)
    pd.add_argument("--out", required=True)
    pd.add_argument("--new-tokens", type=int, default=0, help="default: the training length minus the prompt")
    pd.add_argument("--prompt-tokens", type=int, default=0, help="0: unconditional (from [BOS])")
    pd.add_argument("--batch-size", type=int, default=32)
    pd.add_argument("--seed", type=int, default=0)
    pd.set_defaults(func=cmd_posttrain_adjust_data)
    pa = pt.add_parser("adjust", allow_abbrev=False, help="train the ADJUST sampler layer")
    pa.add_argument("--checkpoint", required=True)
    pa.add_argument("--trajectories", required=True)
    pa.add_argument("--k", type=int, default=4, help="tokens per full forward (longest unroll)")
    pa.add_argument("--out", required=True)
    pa.add_argument("--steps", type=int, default=500)
    pa.add_argument("--batch-size", type=int, default=32)
    pa.add_argument("--lr", type=float, default=5e-5)
    pa.add_argument("--valid-fraction", type=float, default=0.1, help="trajectories held out for the KL")
    pa.set_defaults(func=cmd_posttrain_adjust)

    d = sub.add_parser("demo", allow_abbrev=False, help="train a small BD3-LM on the embedded corpus")
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--out", default="runs/demo-bd3lm")
    d.set_defaults(func=cmd_demo)

    add_bench_commands(sub)
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
