"""`unmask serve`: an OpenAI-compatible HTTP API (FastAPI) over the batching engine, Prometheus
metrics, health, and the live page at `/` that shows the canvas being denoised.

Endpoints: `/v1/completions` (with `suffix`: fill-in-the-middle on bidirectional models),
`/v1/chat/completions` (the model's chat template: the tokenizer's for pretrained chat models, the
repo's `chat` template for unmask's own), `/v1/models`, `/health`, `/metrics`, `/`. Bad input is an
OpenAI-style error with status 400 naming the field; a full queue is 429 with `Retry-After`; a
request past `--request-timeout` is 408; with `--api-key`, `/v1/*` needs `Authorization: Bearer KEY`.

`Service` holds the state and the stages a request goes through (check the model, plan and build
the jobs, submit them, await their results, shape the answer); each endpoint is one method of it,
and `create_app` only wires them into a FastAPI app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from html import escape
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from unmask.config import ConfigError
from unmask.decoding.plan import DecodeError
from unmask.serve.api import (
    DECODE_FIELDS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    decode_settings,
    stops,
    usage,
)
from unmask.serve.engine import Engine, QueueFull
from unmask.serve.guard import Edges
from unmask.serve.jobs import Job
from unmask.serve.metrics import Metrics
from unmask.serve.scoring import scored_answer, tokenizer_info
from unmask.serve.streaming import sse

log = logging.getLogger("unmask.serve")
PAGE = Path(__file__).parent / "static" / "index.html"


DISCONNECT_POLL = 0.25  # seconds between two checks that a non-streamed request's client is there


class Service:
    def __init__(
        self,
        engine: Engine,
        *,
        model_name: str,
        default_preset: str,
        request_timeout: float,
        max_prompt_tokens: int = 4096,
        max_new_tokens: int = 4096,
    ):
        self.engine, self.model_name, self.default_preset = engine, model_name, default_preset
        self.request_timeout = request_timeout
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.metrics = Metrics()
        engine.on_batch = self.metrics.on_batch
        engine.on_forward = self.metrics.on_forward
        engine.on_queued = self.metrics.queued.observe

    # ------------------------------------------------------------------------------ stages

    def error(self, e: APIError) -> JSONResponse:
        self.metrics.requests.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(f"unknown model {name!r}; this server serves {self.model_name!r}", param="model")

    def plan(self, req):
        """The request's decode plan; a DecodeError (a setting the model cannot take) is a 400."""
        cfg = decode_settings(req, self.default_preset, self.max_new_tokens)
        try:
            return self.engine.plan(cfg)
        except (DecodeError, ConfigError) as e:
            raise APIError(str(e).replace("--decode.", ""), param=_param_of(str(e), req)) from e

    def prompts(self, req: CompletionRequest, plan=None) -> list[list[int]]:
        """Each prompt's token ids: text (bounded in characters before it is tokenized) or ids
        (each in the vocabulary, [BOS] put in front as text prompts get it)."""
        tok = self.engine.tok
        p = req.prompt
        if isinstance(p, str) or (p and all(isinstance(x, str) for x in p)):
            texts = [p] if isinstance(p, str) else p
            for t in texts:  # a token holds at most a few dozen characters: refuse before tokenizing
                if len(t) > 32 * self.max_prompt_tokens:
                    raise APIError(f"the prompt has {len(t)} characters, over {self.max_prompt_tokens} "
                                   "tokens' worth (--max-prompt-tokens)", param="prompt")  # fmt: skip
            if req.suffix is not None:
                return [plan.suffix_ids(t, req.suffix) for t in texts]
            return [tok.prompt_ids(t) for t in texts]
        if req.suffix is not None:
            raise APIError("suffix needs a text prompt", param="suffix")
        rows = [p] if p and isinstance(p[0], int) else p
        vocab = self.engine.tok.vocab_size
        for ids in rows:
            if not ids:
                raise APIError("a token-id prompt must not be empty", param="prompt")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(f"token id {bad} is not in this model's vocabulary (0..{vocab - 1})",
                               param="prompt")  # fmt: skip
        return [list(ids) if ids[:1] == [tok.bos_id] else [tok.bos_id, *ids] for ids in rows]

    def check_prompt_tokens(self, prompts: list[list[int]]) -> None:
        for ids in prompts:
            if len(ids) > self.max_prompt_tokens:
                raise APIError(f"the prompt has {len(ids)} tokens; this server takes at most "
                               f"{self.max_prompt_tokens} (--max-prompt-tokens)", param="prompt")  # fmt: skip

    def jobs(self, prompts: list[list[int]], req, plan, *, template: bool = False) -> list[Job]:
        """One job per prompt's token ids (each of `req.n` rows), checked against the canvas."""
        if req.canvas and not req.stream:
            raise APIError("canvas needs stream: true", param="canvas")
        if req.stream_options is not None and not req.stream:
            raise APIError("stream_options needs stream: true", param="stream_options")
        stop, loop = stops(req), asyncio.get_running_loop()
        if len(prompts) > self.engine.max_queue:
            raise APIError(f"{len(prompts)} prompts in one request; this server queues at most "
                           f"{self.engine.max_queue} (--max-queue)", param="prompt")  # fmt: skip
        self.check_prompt_tokens(prompts)
        out = []
        for ids in prompts:
            try:
                plan.check_length(len(ids), template=template)
            except DecodeError as e:
                max_len = plan.max_len or 0
                param = "max_tokens" if plan.cfg.max_new_tokens >= max_len else "prompt"
                raise APIError(f"{e} (this model's canvas)", param=param) from e
            out.append(
                Job(
                    ids,
                    plan,
                    req.seed or 0,
                    req.n,
                    loop,
                    stream=req.stream,
                    canvas=req.canvas,
                    stop=stop,
                    template=template,
                    stream_usage=bool(req.stream_options and req.stream_options.include_usage),
                    logprobs=getattr(req, "logprobs", None),
                )
            )
        return out

    def submit(self, jobs: list[Job]) -> None:
        for i, job in enumerate(jobs):
            try:
                self.engine.submit(job)
            except QueueFull as e:
                for j in jobs[:i]:
                    self.engine.cancel(j)
                raise APIError(
                    f"the server is busy: {e}; retry shortly",
                    status=429,
                    kind="rate_limit_error",
                    headers={"Retry-After": "1"},
                ) from e
        self.metrics.in_flight.inc()
        self.metrics.queue.set(len(self.engine.waiting))

    async def next_event(self, job: Job, deadline: float, raw: Request | None = None) -> tuple[str, Any]:
        """The job's next event; with `raw` (a non-streamed request), a client that hangs up is
        noticed within `DISCONNECT_POLL` seconds (streams are cancelled by Starlette instead)."""
        while True:
            left = deadline - time.monotonic()
            wait = max(min(left, DISCONNECT_POLL) if raw is not None else left, 0.001)
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), wait)
                break
            except TimeoutError as e:
                if time.monotonic() >= deadline:
                    raise APIError(
                        f"the request took longer than --request-timeout {self.request_timeout:g}s",
                        status=408,
                        kind="timeout",
                    ) from e
                if raw is not None and await raw.is_disconnected():
                    raise APIError(
                        "the client closed the connection", status=499, kind="client_closed"
                    ) from e
        if kind == "error":  # the server is shutting down
            raise APIError(str(payload), status=503, kind="server_error")
        if kind == "failed":  # a bug: logged with this id by the engine, never shown to clients
            raise APIError(f"internal error while decoding (request id {payload})", status=500,
                           kind="server_error")  # fmt: skip
        return kind, payload

    async def results(self, jobs: list[Job], raw: Request | None = None) -> list[dict]:
        """Every job's `done` payload (a non-streamed answer); its latency and 200 are recorded. A
        timeout or a client gone cancels the jobs: the engine stops their batch at its next step."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.request_timeout
        out = []
        try:
            for job in jobs:
                while True:
                    kind, payload = await self.next_event(job, deadline, raw)
                    if kind == "done":
                        out.append(payload)
                        break
        finally:
            for job in jobs:
                self.engine.cancel(job)
            self.metrics.in_flight.dec()
        self.metrics.latency.observe(time.perf_counter() - t0)
        self.metrics.requests.labels("200").inc()
        return out

    def answer(
        self, obj: str, rid: str, created: int, choices: list[dict], done: list[dict]
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": self.model_name,
            "choices": choices,
            "usage": usage(done),
        }

    # --------------------------------------------------------------------------- endpoints

    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "queue_depth": len(self.engine.waiting),
            "running_rows": self.engine.running_rows,
        }

    async def prometheus(self) -> Response:
        self.metrics.queue.set(len(self.engine.waiting))
        self.metrics.rows.set(self.engine.running_rows)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(self) -> HTMLResponse:
        def as_js(v: str) -> str:
            return json.dumps(v).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

        # HTML-escaped in the text; a JSON string (with <, >, & escaped) inside the script
        html = PAGE.read_text()
        html = html.replace('"{{MODEL}}"', as_js(self.model_name)).replace(
            '"{{PRESET}}"', as_js(self.default_preset)
        )
        return HTMLResponse(html.replace("{{MODEL}}", escape(self.model_name)))

    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "unmask"}],
        }

    async def completions(self, req: CompletionRequest, raw: Request):
        self.check_model(req.model)
        if not req.prompt and not isinstance(req.prompt, str):
            raise APIError("prompt must not be an empty list", param="prompt")
        if req.echo:
            return await scored_answer(self, req)
        if req.logprobs is not None and req.stream:
            raise APIError("logprobs are returned with stream: false only", param="logprobs")
        plan = self.plan(req)
        if req.suffix is not None and plan.kind != "bidirectional":
            raise APIError(
                f"suffix (fill-in-the-middle) needs a bidirectional model; this one is {plan.kind}",
                param="suffix",
            )
        prompts = await asyncio.to_thread(self.prompts, req, plan)  # tokenizing off the event loop
        jobs = self.jobs(prompts, req, plan, template=req.suffix is not None)
        self.submit(jobs)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return sse(self, jobs, rid, created, chat=False)
        done = await self.results(jobs, raw)
        choices = [
            {
                "text": c["text"],
                "index": p * req.n + i,
                "logprobs": c["logprobs"],
                "finish_reason": c["finish_reason"],
            }
            for p, d in enumerate(done)
            for i, c in enumerate(d["choices"])
        ]
        return self.answer("text_completion", rid, created, choices, done)

    async def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's tokenizer endpoints (lm-eval's `local-completions` uses them when present)."""
        return tokenizer_info(self.engine.tok, self.model_name, self.max_prompt_tokens)

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        tok = self.engine.tok
        if len(body.prompt) > 32 * self.max_prompt_tokens:
            raise APIError(
                f"the prompt has {len(body.prompt)} characters (--max-prompt-tokens)", param="prompt"
            )
        encode = tok.prompt_ids if body.add_special_tokens else tok.encode
        ids = await asyncio.to_thread(encode, body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_prompt_tokens}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        tok = self.engine.tok
        bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise APIError(f"token id {bad} is not in this model's vocabulary", param="tokens")
        return {"prompt": tok.decode(body.tokens, skip_special=False)}

    async def chat_completions(self, req: ChatCompletionRequest, raw: Request):
        self.check_model(req.model)
        if not req.messages:
            raise APIError("messages must not be empty", param="messages")
        plan = self.plan(req)
        turns = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = await asyncio.to_thread(plan.chat_ids, turns)  # tokenizing off the event loop
        except ValueError as e:  # no chat template, a template that rejects the turns
            raise APIError(f"cannot apply the chat template: {e}", param="messages") from e
        jobs = self.jobs([ids], req, plan)
        self.submit(jobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return sse(self, jobs, rid, created, chat=True)
        done = await self.results(jobs, raw)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"],
            }
            for i, c in enumerate(done[0]["choices"])
        ]
        return self.answer("chat.completion", rid, created, choices, done)


def _param_of(message: str, req) -> str | None:
    """The field a plan's refusal is about: one the request sent that the message names, else its
    preset (a preset's own settings), else the first field the message names."""
    named = [n for n in re.findall(r"[a-z_]+", message) if n in DECODE_FIELDS]
    sent = set(req.model_extra or {})
    return (
        next((n for n in named if n in sent), None)
        or ("preset" if req.preset else None)
        or (named[0] if named else None)
    )


def create_app(
    engine: Engine,
    *,
    model_name: str,
    default_preset: str,
    api_key: str | None = None,
    request_timeout: float = 300.0,
    max_prompt_tokens: int = 4096,
    max_new_tokens: int = 4096,
    max_body_bytes: int = 1 << 20,
    allowed_hosts: tuple[str, ...] | None = None,
    open_metrics: bool = False,
) -> FastAPI:
    """The app; `allowed_hosts` None accepts any Host (see `serve.guard` for the edges)."""
    service = Service(engine, model_name=model_name, default_preset=default_preset,
                      request_timeout=request_timeout, max_prompt_tokens=max_prompt_tokens,
                      max_new_tokens=max_new_tokens)  # fmt: skip

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
    app.state.engine, app.state.metrics, app.state.service = engine, service.metrics, service

    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return service.error(e)

    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return service.error(_validation_error(e))

    async def bug(request: Request, e: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:12]
        log.exception("internal error %s on %s %s", rid, request.method, request.url.path)
        return service.error(APIError(f"internal error (request id {rid})", status=500, kind="server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, bug)
    app.add_middleware(AccessLog)
    app.add_middleware(
        Edges,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts,
        open_metrics=open_metrics,
        on_refused=lambda status: service.metrics.requests.labels(str(status)).inc(),
    )
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/metrics", service.prometheus, methods=["GET"])
    app.add_api_route("/", service.page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/v1/completions", service.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    app.add_api_route("/tokenizer_info", service.tokenizer_info, methods=["GET"])
    app.add_api_route("/tokenize", service.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", service.detokenize, methods=["POST"])
    return app


def _validation_error(e: RequestValidationError) -> APIError:
    """FastAPI's body validation error as an OpenAI-style 400 naming the first bad field."""
    first = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
    return APIError(f"{'.'.join(loc) + ': ' if loc else ''}{message}", param=param)


class AccessLog:
    """One log line per request (method, path, status, seconds). Pure ASGI, so the handler's
    `Request.is_disconnected()` sees the client leave (Starlette's `BaseHTTPMiddleware` hides it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info("%s %s %d %.3fs", scope["method"], scope["path"], status[0], time.perf_counter() - t0)
