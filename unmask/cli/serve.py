"""`unmask serve`: an OpenAI-compatible server for a checkpoint, with the live page at `/`."""

from __future__ import annotations

import argparse

from unmask.cli.flags import CHECKPOINT_HELP


def cmd_serve(ns: argparse.Namespace, rest: list[str]) -> None:
    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask serve`: {' '.join(rest)}")
    try:
        import uvicorn

        from unmask.serve.server import build_app, uvicorn_config
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
        api_key=api_key(ns),
        max_queue=ns.max_queue,
        max_batch_rows=ns.max_batch_rows,
        max_batch_tokens=ns.max_batch_tokens,
        batching=ns.batching,
        request_timeout=ns.request_timeout,
        precision=ns.precision,
        device=ns.device,
        tokenizer=ns.tokenizer,
        dtype=ns.dtype,
        host=ns.host,
        allowed_hosts=tuple(h for h in (ns.allowed_hosts or "").split(",") if h),
        max_prompt_tokens=ns.max_prompt_tokens,
        max_new_tokens=ns.max_new_tokens,
        max_body_bytes=ns.max_body_bytes,
        open_metrics=ns.open_metrics,
        threads=ns.threads,
    )
    print(f"serving {ns.checkpoint} at http://{ns.host}:{ns.port}/ (OpenAI API under /v1)")
    uvicorn.Server(uvicorn_config(app, ns.host, ns.port, max_connections=ns.max_connections,
                                  log_level="warning")).run()  # fmt: skip


def api_key(ns: argparse.Namespace) -> str | None:
    """The key from --api-key-file, else $UNMASK_API_KEY, else --api-key (visible in `ps`)."""
    import os
    from pathlib import Path

    from unmask.config import ConfigError

    if ns.api_key_file:
        try:
            key = Path(ns.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--api-key-file {ns.api_key_file}: {e.strerror}") from e
        if not key:
            raise ConfigError(f"--api-key-file {ns.api_key_file} is empty")
        return key
    return os.environ.get("UNMASK_API_KEY") or ns.api_key


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
    s.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for decoding (default 0: every core but one, kept for the event loop)",
    )
    s.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    s.add_argument("--preset", help="default decoder preset (default: bd3lm for block-causal, else mdlm)")
    key_help = "require `Authorization: Bearer KEY` on /v1/*, /metrics and the API docs (visible in `ps`:"
    s.add_argument("--api-key", help=key_help + " prefer $UNMASK_API_KEY or --api-key-file)")
    s.add_argument("--api-key-file", help="read the API key from this file")
    s.add_argument("--open-metrics", action="store_true", help="serve /metrics without the key (a scraper)")
    s.add_argument("--allowed-hosts", help="comma-separated Host names to answer besides loopback ones")
    context = "default: a pretrained family's context, else 4096"
    s.add_argument("--max-prompt-tokens", type=int, help=f"longest prompt (400 beyond; {context})")
    s.add_argument("--max-new-tokens", type=int, help=f"largest max_tokens (400 beyond; {context})")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    s.add_argument("--max-connections", type=int, default=256, help="open connections (503 beyond)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument(
        "--max-batch-rows", type=int, default=32, help="rows decoded together (running jobs' rows)"
    )
    s.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="positions (rows x padded width) one shared forward computes at most")  # fmt: skip
    s.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous: jobs join and leave at every step, sharing forwards whatever their "
                   "prompt and settings; static: one batch of same-length, same-settings jobs at a "
                   "time")  # fmt: skip
    s.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request gets 408")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=cmd_serve)
