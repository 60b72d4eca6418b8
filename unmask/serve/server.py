"""Build the app for a checkpoint, and run it under uvicorn — in the foreground (`unmask serve`) or
in a background thread on a free loopback port (tests, `unmask bench serve`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from unmask.models.checkpoint import load_checkpoint
from unmask.serve.app import create_app
from unmask.serve.engine import Engine


def build_app(
    checkpoint: str | Path,
    *,
    model_name: str | None = None,
    preset: str | None = None,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch_rows: int = 32,
    request_timeout: float = 300.0,
    precision: str = "auto",
    device: str | None = None,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(checkpoint, tokenizer=tokenizer, device=device, dtype=dtype)
    model = loaded.model.to(device).eval()
    engine = Engine(
        model,
        loaded.tokenizer,
        loaded.config,
        max_queue=max_queue,
        max_batch_rows=max_batch_rows,
        precision=precision,
    )
    default = preset or (
        loaded.config.decode.preset  # a pretrained family's own decoder
        if "pretrained" in loaded.state
        else {"block_causal": "bd3lm", "bidirectional": "mdlm", "causal": "mdlm"}[model.cfg.attention]
    )
    return create_app(
        engine,
        model_name=model_name or Path(checkpoint).name,
        default_preset=default,
        api_key=api_key,
        request_timeout=request_timeout,
    )


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def run_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Start `app` on host:port (0: a free port) in a daemon thread; returns once it accepts."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    return RunningServer(server, thread, f"http://{bound[0]}:{bound[1]}")
