"""`unmask serve`: an OpenAI-compatible HTTP API (FastAPI) over the batching engine, Prometheus
metrics, health, and the live page at `/` that shows the canvas being denoised.

Endpoints: `/v1/completions`, `/v1/chat/completions` (the `chat` prompt template of
`unmask/data/templates.toml`), `/v1/models`, `/health`, `/metrics`, `/`. Bad input is an
OpenAI-style error with status 400 naming the field; a full queue is 429 with `Retry-After`; a
request past `--request-timeout` is 408; with `--api-key`, `/v1/*` needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from unmask.data.instruct import load_template
from unmask.serve.api import APIError, ChatCompletionRequest, CompletionRequest, decode_settings, stops
from unmask.serve.engine import Engine, Job, QueueFull

log = logging.getLogger("unmask.serve")
PAGE = Path(__file__).parent / "static" / "index.html"


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body generator when the response ends, however it ends.

    When a client disconnects, Starlette cancels the sending task; a generator suspended at a
    `yield` at that moment is otherwise only closed when garbage-collected, so its `finally`
    (cancelling the jobs, freeing the request's slot) could wait indefinitely.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("unmask_queue_depth", "requests waiting for a batch", registry=r)
        self.rows = Gauge("unmask_running_rows", "rows in the batch being decoded", registry=r)
        self.in_flight = Gauge(
            "unmask_requests_in_flight", "requests accepted and not yet answered", registry=r
        )
        self.requests = Counter("unmask_requests", "requests by HTTP status", ["status"], registry=r)
        self.tokens = Counter("unmask_completion_tokens", "tokens generated", registry=r)
        self.nfe = Counter("unmask_nfe", "model forward calls (NFE)", registry=r)
        self.tokens_per_s = Gauge("unmask_tokens_per_second", "tokens/s of the last batch", registry=r)
        self.nfe_per_s = Gauge("unmask_nfe_per_second", "NFE/s of the last batch", registry=r)
        self.latency = Histogram("unmask_request_seconds", "request latency", registry=r)

    def on_batch(self, tokens: int, nfe: int, seconds: float, rows: int) -> None:
        self.tokens.inc(tokens)
        self.nfe.inc(nfe)
        self.tokens_per_s.set(tokens / max(seconds, 1e-9))
        self.nfe_per_s.set(nfe / max(seconds, 1e-9))


def create_app(
    engine: Engine,
    *,
    model_name: str,
    default_preset: str,
    api_key: str | None = None,
    request_timeout: float = 300.0,
) -> FastAPI:
    metrics = Metrics()
    engine.on_batch = metrics.on_batch

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown)  # graceful: running batch finishes, waiting ones are told

    app = FastAPI(
        title="unmask",
        version="0.1",
        lifespan=lifespan,
        description="OpenAI-compatible API for masked and block diffusion language models",
    )
    app.state.engine, app.state.metrics = engine, metrics

    def error(e: APIError) -> JSONResponse:
        metrics.requests.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
        return error(APIError(f"{'.'.join(loc) + ': ' if loc else ''}{message}", param=param))

    @app.middleware("http")
    async def _auth_and_log(request: Request, call_next):
        t0 = time.perf_counter()
        if (
            api_key
            and request.url.path.startswith("/v1/")
            and request.headers.get("authorization") != f"Bearer {api_key}"
        ):
            response = error(
                APIError(
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    status=401,
                    kind="authentication_error",
                )
            )
        else:
            response = await call_next(request)
        log.info(
            "%s %s %d %.3fs", request.method, request.url.path, response.status_code, time.perf_counter() - t0
        )
        return response

    # ------------------------------------------------------------------------------ helpers

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(f"unknown model {name!r}; this server serves {model_name!r}", param="model")

    def make_jobs(prompts: list[str], req) -> list[Job]:
        cfg = decode_settings(req, default_preset)
        stop = stops(req)
        if req.canvas and not req.stream:
            raise APIError("canvas needs stream: true", param="canvas")
        jobs = []
        for p in prompts:
            ids = engine.tok.prompt_ids(p)
            if engine.max_len is not None and len(ids) + cfg.max_new_tokens > engine.max_len:
                param = "max_tokens" if cfg.max_new_tokens >= engine.max_len else "prompt"
                raise APIError(
                    f"prompt of {len(ids)} tokens + max_tokens {cfg.max_new_tokens} exceeds this "
                    f"model's canvas of {engine.max_len} tokens",
                    param=param,
                )
            jobs.append(
                Job(
                    ids,
                    cfg,
                    req.seed or 0,
                    req.n,
                    asyncio.get_running_loop(),
                    stream=req.stream,
                    canvas=req.canvas,
                    stop=stop,
                )
            )
        return jobs

    def submit(jobs: list[Job]) -> None:
        for i, job in enumerate(jobs):
            try:
                engine.submit(job)
            except QueueFull as e:
                for j in jobs[:i]:
                    engine.cancel(j)
                raise APIError(
                    f"the server is busy: {e}; retry shortly",
                    status=429,
                    kind="rate_limit_error",
                    headers={"Retry-After": "1"},
                ) from e
        metrics.in_flight.inc()
        metrics.queue.set(len(engine.waiting))

    async def next_event(job: Job, deadline: float) -> tuple[str, Any]:
        try:
            kind, payload = await asyncio.wait_for(job.events.get(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError as e:
            raise APIError(
                f"the request took longer than --request-timeout {request_timeout:g}s",
                status=408,
                kind="timeout",
            ) from e
        if kind == "error":
            raise APIError(str(payload), status=503, kind="server_error")
        return kind, payload

    async def results(jobs: list[Job]) -> list[dict]:
        """Every job's `done` payload (a non-streamed answer); its latency and 200 are recorded."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + request_timeout
        out = []
        try:
            for job in jobs:
                while True:
                    kind, payload = await next_event(job, deadline)
                    if kind == "done":
                        out.append(payload)
                        break
        finally:
            for job in jobs:
                engine.cancel(job)
            metrics.in_flight.dec()
        metrics.latency.observe(time.perf_counter() - t0)
        metrics.requests.labels("200").inc()
        return out

    def answer(obj: str, rid: str, created: int, choices: list[dict], done: list[dict]) -> dict[str, Any]:
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": usage(done),
        }

    def usage(done: list[dict]) -> dict[str, int]:
        prompt = sum(d["prompt_tokens"] for d in done)
        completion = sum(c["tokens"] for d in done for c in d["choices"])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "nfe": sum(d["nfe"] for d in done),
        }

    # ---------------------------------------------------------------------------- endpoints

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "queue_depth": len(engine.waiting),
            "running_rows": engine.running_rows,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue.set(len(engine.waiting))
        metrics.rows.set(engine.running_rows)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(
            PAGE.read_text().replace("{{MODEL}}", model_name).replace("{{PRESET}}", default_preset)
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "unmask"}],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError("prompt must not be an empty list", param="prompt")
        jobs = make_jobs(prompts, req)
        submit(jobs)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return sse(jobs, rid, created, chat=False)
        done = await results(jobs)
        choices = [
            {"text": c["text"], "index": p * req.n + i, "logprobs": None, "finish_reason": c["finish_reason"]}
            for p, d in enumerate(done)
            for i, c in enumerate(d["choices"])
        ]
        return answer("text_completion", rid, created, choices, done)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        if not req.messages:
            raise APIError("messages must not be empty", param="messages")
        prompt = load_template("chat").chat([m.model_dump() for m in req.messages])
        jobs = make_jobs([prompt], req)
        submit(jobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return sse(jobs, rid, created, chat=True)
        done = await results(jobs)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"],
            }
            for i, c in enumerate(done[0]["choices"])
        ]
        return answer("chat.completion", rid, created, choices, done)

    # ------------------------------------------------------------------------------ streaming

    def sse(jobs: list[Job], rid: str, created: int, *, chat: bool) -> StreamingResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = jobs[0].n

        def chunk(index: int, text: str | None, finish: str | None, extra: dict | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if text is not None else {}
                choice = {"index": index, "delta": delta, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
            body = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": [choice],
                **(extra or {}),
            }
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            deadline = time.monotonic() + request_timeout
            t0 = time.perf_counter()
            status = "200"
            try:
                for p, job in enumerate(jobs):
                    streamed = [""] * n
                    while True:
                        try:
                            kind, payload = await next_event(job, deadline)
                        except APIError as e:
                            status = str(e.status)
                            yield f"data: {json.dumps(e.body())}\n\n"
                            return
                        if kind == "delta":
                            i, text = payload
                            streamed[i] += text
                            yield chunk(p * n + i, text, None)
                        elif kind == "canvas":
                            yield f"event: canvas\ndata: {json.dumps(payload)}\n\n"
                        else:  # done: the rest of each row's final text, then its finish reason
                            for i, c in enumerate(payload["choices"]):
                                rest = (
                                    c["text"][len(streamed[i]) :] if c["text"].startswith(streamed[i]) else ""
                                )
                                if rest:
                                    yield chunk(p * n + i, rest, None)
                                yield chunk(
                                    p * n + i,
                                    None if chat else "",
                                    c["finish_reason"],
                                    {"usage": usage([payload])} if i == n - 1 else None,
                                )
                            break
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away: its jobs leave the queue
                for job in jobs:
                    engine.cancel(job)
                metrics.in_flight.dec()
                metrics.latency.observe(time.perf_counter() - t0)
                metrics.requests.labels(status).inc()

        return ClosingStreamingResponse(events(), media_type="text/event-stream")

    return app
