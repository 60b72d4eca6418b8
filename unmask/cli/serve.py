"""`unmask serve`: an OpenAI-compatible server for a checkpoint, with the live page at `/`."""

from __future__ import annotations

import argparse

from unmask.cli.flags import CHECKPOINT_HELP


def cmd_serve(ns: argparse.Namespace, rest: list[str]) -> None:
    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask serve`: {' '.join(rest)}")
    try:
        import uvicorn

        from unmask.serve.server import build_app
    except ImportError as e:
        from unmask.config import ConfigError

        raise ConfigError(
            f"unmask serve needs the optional serving packages ({e}): pip install 'unmask[serve]'"
        ) from e
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(
        ns.checkpoint,
        model_name=ns.model_name,
        preset=ns.preset,
        api_key=ns.api_key,
        max_queue=ns.max_queue,
        max_batch_rows=ns.max_batch_rows,
        request_timeout=ns.request_timeout,
        precision=ns.precision,
        device=ns.device,
        tokenizer=ns.tokenizer,
        dtype=ns.dtype,
    )
    print(f"serving {ns.checkpoint} at http://{ns.host}:{ns.port}/ (OpenAI API under /v1)")
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning")


def add_serve_command(sub) -> None:
    s = sub.add_parser("serve", allow_abbrev=False, help="OpenAI-compatible server and live page")
    s.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    s.add_argument("--tokenizer", help="tokenizer dir for pretrained models that ship none (MDLM/BD3-LM)")
    s.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights of a pretrained directory (auto: bf16 on GPUs)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    s.add_argument("--preset", help="default decoder preset (default: bd3lm for block-causal, else mdlm)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument("--max-batch-rows", type=int, default=32, help="rows decoded together")
    s.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request gets 408")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=cmd_serve)
