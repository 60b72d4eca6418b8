"""`unmask repro ...` and `unmask demo`: the small-scale paper reproductions and the main job."""

from __future__ import annotations

import argparse


def cmd_repro_adjust(ns: argparse.Namespace, rest: list[str]) -> None:
    if ns.synthetic:  # the known-answer task: codebook chunks
        from unmask.repro.synthetic import adjust_codebook_table, repro_adjust_codebook

        print(
            adjust_codebook_table(
                repro_adjust_codebook(
                    out=ns.out or "runs/repro-adjust-codebook",
                    trajectories=ns.trajectories,
                    samples=ns.samples,
                    sampler_steps=ns.steps or 6000,
                )
            )
        )
        return
    from unmask.repro.adjust import adjust_table, repro_adjust

    print(
        adjust_table(
            repro_adjust(
                out=ns.out or "runs/repro-adjust",
                trajectories=ns.trajectories,
                samples=ns.samples,
                steps=ns.steps or 400,
            )
        )
    )


def cmd_repro_r2ft(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro.r2ft import r2ft_table, repro_r2ft

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask repro r2ft`: {' '.join(rest)}")
    print(
        r2ft_table(
            repro_r2ft(
                out=ns.out,
                sft_steps=ns.sft_steps,
                r2ft_steps=ns.r2ft_steps,
                canvas=ns.canvas,
                samples=ns.samples,
                kernel=ns.kernel,
                humaneval=not ns.no_humaneval,
                eos=ns.eos,
            )
        )
    )


def cmd_repro_soft_mask(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro.soft_mask import repro_soft_mask, soft_mask_table

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask repro soft-mask`: {' '.join(rest)}")
    if ns.synthetic:  # the known-answer task: a sparse Markov chain
        from unmask.repro.synthetic import repro_soft_mask_markov, soft_mask_markov_table

        print(
            soft_mask_markov_table(
                repro_soft_mask_markov(
                    out=ns.out or "runs/repro-soft-mask-markov",
                    steps=ns.steps or 300,
                    samples=ns.samples or 64,
                )
            )
        )
        return
    print(
        soft_mask_table(
            repro_soft_mask(
                out=ns.out or "runs/repro-soft-mask", steps=ns.steps or 500, samples=ns.samples or 128
            )
        )
    )


def cmd_repro(ns: argparse.Namespace, rest: list[str]) -> None:
    from unmask.repro.bd3lm import (
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
    from unmask.repro.demo import demo

    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask demo`: {' '.join(rest)}")
    print(demo(steps=ns.steps, out=ns.out))


def add_repro_commands(sub) -> None:
    r = sub.add_parser("repro", help="small-scale reproductions").add_subparsers(dest="what", required=True)
    rb = r.add_parser("bd3lm", allow_abbrev=False, help="AR vs MDLM vs BD3-LM L'=16/8/4 test PPL")
    rb.add_argument("--steps", type=int, default=None, help="training steps per arm (same for all)")
    rb.add_argument("--out", default="runs/repro-bd3lm", help="where the arms' runs are cached")
    rb.add_argument("--mc-samples", type=int, default=8)
    rb.add_argument(
        "--samples",
        type=int,
        default=128,
        help="unconditional samples per arm for the sampling comparison (0 skips it)",
    )
    rb.set_defaults(func=cmd_repro)
    rs = r.add_parser("soft-mask", allow_abbrev=False, help="binary vs soft-masked continued training")
    rs.add_argument("--steps", type=int, default=0, help="continued-training updates (500; 300 synthetic)")
    rs.add_argument("--samples", type=int, default=0, help="held-out prompts (128; 64 synthetic)")
    rs.add_argument("--out", default=None, help="default runs/repro-soft-mask (-markov with --synthetic)")
    rs.add_argument(
        "--synthetic",
        action="store_true",
        help="the known-answer task: synthetic:markov, forbidden bigrams at 1-16 tokens/step",
    )
    rs.set_defaults(func=cmd_repro_soft_mask)
    ra = r.add_parser("adjust", allow_abbrev=False, help="exact vs marginal vs ADJUST, MAUVE vs exact")
    ra.add_argument("--trajectories", type=int, default=512)
    ra.add_argument("--samples", type=int, default=256)
    ra.add_argument("--steps", type=int, default=0, help="sampler training steps per K (400; 6000 synthetic)")
    ra.add_argument("--out", default=None, help="default runs/repro-adjust (-codebook with --synthetic)")
    ra.add_argument(
        "--synthetic",
        action="store_true",
        help="the known-answer task: synthetic:codebook, K = 2, 4, 8, chunk validity",
    )
    ra.set_defaults(func=cmd_repro_adjust)

    rr = r.add_parser(
        "r2ft",
        allow_abbrev=False,
        help="{SFT, SFT+R2FT} x {llada, semi-ar, topk-glob, conv} on stdlib-functions",
    )
    rr.add_argument("--sft-steps", type=int, default=800)
    rr.add_argument("--r2ft-steps", type=int, default=300)
    rr.add_argument("--canvas", type=int, default=256, help="new tokens per prompt (steps = canvas / 8)")
    rr.add_argument("--samples", type=int, default=128, help="held-out prompts")
    rr.add_argument("--kernel", type=int, default=65, help="Conv window (the paper uses about L/4)")
    rr.add_argument("--no-humaneval", action="store_true", help="skip HumanEval pass@1")
    rr.add_argument(
        "--eos", choices=["tail", "all", "first"], default="tail", help="SFT row tail (--instruct.eos)"
    )
    rr.add_argument("--out", default="runs/repro-r2ft")
    rr.set_defaults(func=cmd_repro_r2ft)

    d = sub.add_parser("demo", allow_abbrev=False, help="train a small BD3-LM on the embedded corpus")
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--out", default="runs/demo-bd3lm")
    d.set_defaults(func=cmd_demo)
