"""Build the app for a checkpoint, and run it under uvicorn — in the foreground (`unmask serve`) or
in a background thread on a free loopback port (tests, `unmask bench serve`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from unmask.models.checkpoint import load_checkpoint
from unmask.serve.app import create_app
from unmask.serve.engine import Engine
from unmask.serve.guard import LOOPBACK_NAMES


def default_threads() -> int:
    """Decoding threads: every core but one, which the event loop (HTTP, tokenizing, streaming)
    keeps, so the decode worker never competes with it for every core (measured in
    docs/results.md, "Serving threads"); one on a one- or two-core machine."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def build_app(
    checkpoint: str | Path,
    *,
    model_name: str | None = None,
    preset: str | None = None,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch_rows: int = 32,
    max_batch_tokens: int = 16384,
    batching: str = "continuous",
    request_timeout: float = 300.0,
    precision: str = "auto",
    device: str | None = None,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    host: str = "127.0.0.1",
    allowed_hosts: tuple[str, ...] = (),
    max_prompt_tokens: int | None = None,
    max_new_tokens: int | None = None,
    max_body_bytes: int = 1 << 20,
    open_metrics: bool = False,
    threads: int = 0,
):
    """The app for a checkpoint. Bound to a loopback `host`, only loopback names (and
    `allowed_hosts`) are accepted in `Host:`; elsewhere any, unless `allowed_hosts` names them.
    `threads`: torch's intra-op threads for decoding (0: `default_threads()`)."""
    import torch

    if threads < 0:
        from unmask.config import ConfigError

        raise ConfigError(f"--threads must be >= 0 (0: every core but one), got {threads}")
    torch.set_num_threads(threads or default_threads())

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(checkpoint, tokenizer=tokenizer, device=device, dtype=dtype)
    model = loaded.model.to(device).eval()
    context = getattr(model, "max_len", None) or 4096  # a pretrained family's context, else 4096
    max_prompt_tokens, max_new_tokens = max_prompt_tokens or context, max_new_tokens or context
    engine = Engine(
        model,
        loaded.tokenizer,
        loaded.config,
        max_queue=max_queue,
        max_batch_rows=max_batch_rows,
        max_batch_tokens=max_batch_tokens,
        precision=precision,
        batching=batching,
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
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        max_body_bytes=max_body_bytes,
        allowed_hosts=host_allow_list(host, allowed_hosts),
        open_metrics=open_metrics,
    )


def host_allow_list(host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The Host names a server bound to `host` answers: loopback names (and `extra`) on loopback,
    else `extra` when given, else any (None)."""
    loopback = host in LOOPBACK_NAMES or host.startswith("127.")
    if loopback:
        return (*LOOPBACK_NAMES, host, *extra)
    return tuple(extra) or None


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two more timers: a connection that sends nothing is closed
    after the keep-alive timeout (uvicorn starts that timer only after a first response), and a
    request's headers must be complete within `header_timeout` of the connection opening or of the
    previous response (a client trickling bytes cannot hold a connection)."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._armed_for = self.cycle  # the request cycle before the one whose headers are awaited
        self._header_task = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        task = getattr(self, "_header_task", None)
        if task is not None:
            task.cancel()
        self._header_task = None

    def _headers_too_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not getattr(self, "_armed_for", None):  # a new request's headers arrived
            self._cancel_header_timer()
            self._armed_for = self.cycle

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def uvicorn_config(
    app, host: str, port: int, *, max_connections: int = 256, header_timeout: float = 10.0, **kw
) -> uvicorn.Config:
    """uvicorn's settings for serving: idle connections closed after 5 s, headers due within
    `header_timeout`, at most `max_connections` open (503 beyond)."""
    protocol = type("GuardedH11", (GuardedH11,), {"header_timeout": header_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=5,
                          limit_concurrency=max_connections, **kw)  # fmt: skip


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, **config) -> RunningServer:
    """Start `app` on host:port (0: a free port) in a daemon thread; returns once it accepts.
    `config`: more `uvicorn_config` settings (header_timeout, max_connections)."""
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    return RunningServer(server, thread, f"http://{bound[0]}:{bound[1]}")
