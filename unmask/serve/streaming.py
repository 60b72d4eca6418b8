"""Server-sent events for `stream: true`: OpenAI's chunk shapes (`role` in a choice's first chat
chunk only; with `stream_options.include_usage`, a last chunk with no choices and the usage), and
with `canvas: true` an extension clients can ignore: chunks with no choices and a `canvas` field
(the whole canvas after a step), shaped like the usage chunk that SDKs already pass over."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse

from unmask.serve.api import APIError, usage

if TYPE_CHECKING:
    from unmask.serve.app import Service
    from unmask.serve.jobs import Job


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


def sse(service: Service, jobs: list[Job], rid: str, created: int, *, chat: bool) -> StreamingResponse:
    """The jobs' events as SSE: text deltas, canvases, then each row's rest and finish reason."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    n = jobs[0].n
    include_usage = bool(jobs[0].stream_usage)
    spoken: set[int] = set()  # chat choices whose first chunk (with the role) was sent

    def envelope(choices: list[dict], **extra) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": choices}
        return f"data: {json.dumps({**body, **extra})}\n\n"

    def chunk(index: int, text: str | None, finish: str | None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            if index not in spoken:
                spoken.add(index)
                delta = {"role": "assistant", "content": text or ""}
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        return envelope([choice], **({"usage": None} if include_usage else {}))

    async def events() -> AsyncIterator[str]:
        deadline = time.monotonic() + service.request_timeout
        t0 = time.perf_counter()
        status = "200"
        done: list[dict] = []
        try:
            for p, job in enumerate(jobs):
                streamed = [""] * n
                while True:
                    try:
                        kind, payload = await service.next_event(job, deadline)
                    except APIError as e:
                        status = str(e.status)
                        yield f"data: {json.dumps(e.body())}\n\n"
                        return
                    if kind == "delta":
                        i, text = payload
                        streamed[i] += text
                        yield chunk(p * n + i, text, None)
                    elif kind == "canvas":
                        yield envelope([], canvas={"index": p * n, **payload})
                    else:  # done: the rest of each row's final text, then its finish reason
                        for i, c in enumerate(payload["choices"]):
                            rest = c["text"][len(streamed[i]) :] if c["text"].startswith(streamed[i]) else ""
                            if rest:
                                yield chunk(p * n + i, rest, None)
                            yield chunk(p * n + i, None if chat else "", c["finish_reason"])
                        done.append(payload)
                        break
            if include_usage:
                yield envelope([], usage=usage(done))
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: its jobs leave the queue
            for job in jobs:
                service.engine.cancel(job)
            service.metrics.in_flight.dec()
            service.metrics.latency.observe(time.perf_counter() - t0)
            service.metrics.requests.labels(status).inc()

    return ClosingStreamingResponse(events(), media_type="text/event-stream")
