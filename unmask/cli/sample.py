"""`unmask sample`: decode text from a checkpoint with a preset and any `--decode.field=value`."""

from __future__ import annotations

import argparse
import json
import sys

from unmask.cli.flags import add_model_flags, decode_config, load_model, read_prompts
from unmask.cli.help import config_help

# the names of unmask.decoding.presets.PRESETS, listed here so that --help imports no torch
PRESET_NAMES = (
    "mdlm",
    "first-hitting",
    "bd3lm",
    "semi-ar",
    "llada",
    "fast-dllm",
    "fast-dllm-v2",
    "dream",
    "diffusion-gemma",
    "sdar",
    "sdar-static",
    "llada2",
    "topk-glob",
    "exact-joint",
    "adjust",
    "marginal",
    "conv",
    "conv-ranked",
)


def cmd_sample(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.decoding.sample import render, sample
    from unmask.schedules import build_schedule

    cfg = decode_config(rest, "unmask sample", preset=ns.preset, max_new_tokens=ns.max_new_tokens)
    loaded = load_model(ns)
    if ns.preset is None and "pretrained" in loaded.state and "--preset" not in rest:  # the family's decoder
        cfg = decode_config(
            rest, "unmask sample", preset=loaded.config.decode.preset, max_new_tokens=ns.max_new_tokens
        )
    model, tok = loaded.model, loaded.tokenizer
    sampler = None
    if ns.sampler:
        from unmask.models.adjust_sampler import load_sampler

        sampler = load_sampler(ns.sampler, ns.checkpoint)[0].to(next(model.parameters()).device)
    if ns.compile:
        model.compile_blocks()
    max_len = ns.max_len or (loaded.config.data.seq_len if model.cfg.attention == "bidirectional" else None)
    prompts = ns.infill or read_prompts(ns)
    if ns.infill and (ns.prompt or ns.prompts_file or ns.chat):
        raise SystemExit("error: --infill is the whole text; it takes no --prompt, --prompts-file or --chat")
    on_state = None
    live = None
    if ns.stream:
        from rich.console import Console
        from rich.live import Live
        from rich.panel import Panel

        live = Live(console=Console(stderr=True), refresh_per_second=20, transient=False)
        live.start()

        def on_state(state):
            live.update(
                Panel(render(state, tok), title=f"block {state.block} step {state.step} nfe {state.nfe}")
            )

    finished: list[dict] = []
    try:
        records = sample(
            model,
            tok,
            prompts,
            cfg,
            build_schedule(loaded.config.noise.schedule, loaded.config.noise.eps),
            num_samples=ns.num_samples,
            batch_size=ns.batch_size,
            seed=ns.seed,
            max_len=max_len,
            precision=ns.precision,
            on_state=on_state,
            sampler=sampler,
            chat=ns.chat,
            infill=bool(ns.infill),
            finished=finished,
            progress=not ns.stream,
        )
    except KeyboardInterrupt:  # keep what is done: the finished samples, then exit 130
        if live is not None:
            live.stop()
        _emit(ns, sorted(finished, key=lambda r: r["index"]))
        print(f"interrupted: {len(finished)} finished sample(s) kept", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if live is not None:
            live.stop()
    _emit(ns, records)


def _emit(ns: argparse.Namespace, records: list[dict]) -> None:
    if ns.output:
        with open(ns.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"wrote {len(records)} samples to {ns.output}", file=sys.stderr)
    else:
        for r in records:
            print(f"--- sample {r['index']} (nfe {r['nfe']}, {r['new_tokens']} tokens)")
            print(r["text"] if ns.infill else r["prompt"] + r["text"])


def add_sample_command(sub) -> None:
    s = sub.add_parser(
        "sample",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="decode text; --preset NAME then any --decode.field=value",
        epilog=config_help(("decode",)) + "\n(the preset's values replace these defaults)",
    )
    s.add_argument(
        "--preset",
        default=None,
        help=f"decoder preset ({', '.join(PRESET_NAMES)}; default: mdlm, or a pretrained family's own)",
    )
    s.add_argument("--max-new-tokens", type=int, default=None, help="= --decode.max_new_tokens")
    add_model_flags(s)
    s.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    s.add_argument("--prompt", action="append", help="a prompt (repeatable); none = unconditional")
    s.add_argument("--prompts-file", help="prompts: one per line, or .jsonl with a `prompt` field")
    s.add_argument(
        "--infill",
        action="append",
        metavar="TEMPLATE",
        help="fill the <mask> / <mask*N> slots of this text in place (bidirectional models; "
        "repeatable), e.g. 'def f(x):<mask*16>return y'",
    )
    s.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 on GPUs and CPUs with native bf16, else fp32",
    )
    s.add_argument(
        "--max-len",
        type=int,
        default=0,
        help="longest canvas allowed (default: training length for bidirectional models)",
    )
    s.add_argument("--stream", action="store_true", help="show the canvas filling in")
    s.add_argument("--compile", action="store_true", help="torch.compile the model's blocks first")
    s.add_argument(
        "--sampler", help="ADJUST sampler directory (with --preset adjust, or --decode.refresh sampler)"
    )
    s.add_argument("--output", help="write JSONL records here instead of printing text")
    s.set_defaults(func=cmd_sample)
