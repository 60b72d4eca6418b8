"""`unmask posttrain ...`: instruction SFT, R2FT, ADJUST trajectories and sampler training."""

from __future__ import annotations

import argparse
import os

from unmask.cli.flags import add_model_flags, parse_overrides
from unmask.cli.help import config_help


def cmd_posttrain_instruct(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.training.loop import train
    from unmask.training.posttrain import instruct_config

    base = instruct_config(ns.checkpoint, ns.what, out=ns.out, data=ns.data, template=ns.template)
    cfg = parse_overrides(base, rest, f"unmask posttrain {ns.what}")
    result = train(cfg, init=ns.checkpoint, resume=ns.resume, overwrite=ns.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(
            f"checkpoint: {result.run_dir} (step {result.step}, "
            f"response-only val ppl <= {result.val_ppl:.2f})"
        )


def cmd_posttrain_adjust_data(ns: argparse.Namespace, rest: list[str]) -> None:
    import torch

    from unmask.cli.flags import load_model, read_prompts
    from unmask.data.prompts import file_prompts, heldout_prompts
    from unmask.training.adjust import generate_trajectories

    loaded = load_model(ns)
    pretrained = "pretrained" in loaded.state
    if pretrained and not ns.new_tokens:
        raise SystemExit("error: pass --new-tokens for a pretrained directory (its context is its own)")
    if ns.prompts_file:
        prompts = file_prompts(
            loaded.tokenizer,
            read_prompts(argparse.Namespace(prompt=None, prompts_file=ns.prompts_file)),
            ns.num_trajectories,
        )
    elif pretrained and ns.prompt_tokens:
        raise SystemExit("error: a pretrained directory has no corpus: pass --prompts-file")
    elif ns.prompt_tokens:
        prompts = heldout_prompts(
            loaded.tokenizer, loaded.config.data, ns.num_trajectories, ns.prompt_tokens, split="train"
        )
    else:  # unconditional: from [BOS] ([EOS] for tokenizers without one)
        tok = loaded.tokenizer
        prompts = torch.full((ns.num_trajectories, 1), tok.bos_id if tok.bos_id is not None else tok.eos_id)
    new = ns.new_tokens or loaded.config.data.seq_len - prompts.shape[1]
    traj = generate_trajectories(
        loaded.model, prompts, ns.out, new_tokens=new, batch_size=ns.batch_size, seed=ns.seed
    )
    print(f"{len(traj.prompts)} trajectories of {new} tokens in {ns.out}")


def cmd_posttrain_adjust(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.cli.flags import load_model
    from unmask.training.adjust import load_trajectories, split_trajectories, train_sampler

    loaded = load_model(ns)
    traj, valid = split_trajectories(load_trajectories(ns.trajectories), ns.valid_fraction)
    r = train_sampler(
        loaded.model,
        ns.checkpoint,
        traj,
        valid,
        K=ns.k,
        out=ns.out,
        steps=ns.steps,
        batch_size=ns.batch_size,
        lr=ns.lr,
    )
    print(
        f"sampler ({r['params']:,} parameters, {100 * r['params'] / r['base_params']:.1f}% of the base) "
        f"in {ns.out}; validation KL {r['history'][0]['val_kl']:.4f} -> {r['history'][-1]['val_kl']:.4f} "
        f"(no refresh: {r['history'][-1]['val_naive_kl']:.4f})"
    )


def add_posttrain_commands(sub) -> None:
    pt = sub.add_parser("posttrain", help="post-training").add_subparsers(dest="what", required=True)
    for stage, text in (
        ("sft", "instruction SFT: diffusion loss on response tokens only"),
        ("r2ft", "rejective fine-tuning against rule-made repetition negatives"),
    ):
        pi = pt.add_parser(
            stage,
            allow_abbrev=False,
            help=text + "; any --section.field=value",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=config_help() + "\n(the checkpoint's own config replaces these defaults)",
        )
        pi.add_argument("--checkpoint", required=True, help="the model to post-train (run or checkpoint dir)")
        pi.add_argument("--out", required=True, help="run directory of the new model")
        pi.add_argument(
            "--data",
            help="pairs: stdlib-functions, Alpaca .json/.jsonl, chat .jsonl, hf:NAME "
            "(default: the checkpoint's --instruct.data)",
        )
        pi.add_argument("--template", help="prompt template (alpaca, plain, chat, code; default auto)")
        pi.add_argument("--resume", action="store_true", help="continue the run in --out")
        pi.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
        pi.set_defaults(func=cmd_posttrain_instruct)
    pd = pt.add_parser("adjust-data", allow_abbrev=False, help="exact one-token-per-forward trajectories")
    add_model_flags(pd)
    pd.add_argument("--prompts-file", help="prompts (one per line or JSONL) instead of held-out prefixes")
    pd.add_argument("--num-trajectories", type=int, default=512)
    pd.add_argument("--out", required=True)
    pd.add_argument("--new-tokens", type=int, default=0, help="default: the training length minus the prompt")
    pd.add_argument("--prompt-tokens", type=int, default=0, help="0: unconditional (from [BOS])")
    pd.add_argument("--batch-size", type=int, default=32)
    pd.add_argument("--seed", type=int, default=0)
    pd.set_defaults(func=cmd_posttrain_adjust_data)
    pa = pt.add_parser("adjust", allow_abbrev=False, help="train the ADJUST sampler layer")
    add_model_flags(pa)
    pa.add_argument("--trajectories", required=True)
    pa.add_argument("--k", type=int, default=4, help="tokens per full forward (longest unroll)")
    pa.add_argument("--out", required=True)
    pa.add_argument("--steps", type=int, default=500)
    pa.add_argument("--batch-size", type=int, default=32)
    pa.add_argument("--lr", type=float, default=5e-5)
    pa.add_argument("--valid-fraction", type=float, default=0.1, help="trajectories held out for the KL")
    pa.set_defaults(func=cmd_posttrain_adjust)
