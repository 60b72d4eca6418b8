"""A decoding job of the serving engine: one request's rows, settings, and the event stream its
client reads (`delta`, `canvas`, `done`; `failed` / `error` from the engine)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from unmask.decoding.batches import Record, Request, cut_at_stop
from unmask.decoding.plan import DecodePlan
from unmask.serve.scoring import generated_logprobs


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]  # a prompt, or with `template` a canvas with [MASK]s (fill-in-the-middle)
    plan: DecodePlan
    seed: int
    n: int
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    canvas: bool = False
    stop: tuple[str, ...] = ()
    template: bool = False
    stream_usage: bool = False  # stream_options.include_usage
    logprobs: int | None = None  # each generated token's log-probability when committed, and the top k
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its lane began decoding
    sent: list[str] = field(default_factory=list)  # per row: the text already streamed
    delivered: bool = False  # its `done` (or `failed`) was emitted

    def __post_init__(self) -> None:
        self.sent = [""] * self.n

    @property
    def cfg(self):
        return self.plan.cfg

    def requests(self) -> list[Request]:
        """The job's rows: sample indices 0..n-1 of its seed (as `unmask sample --num-samples n`)."""
        return [
            Request(self.prompt_ids, self.plan, self.seed, i, self.template, self.stop, tag=(self, i))
            for i in range(self.n)
        ]

    @property
    def key(self) -> tuple:
        return (len(self.prompt_ids), self.template, self.plan)

    def emit(self, kind: str, payload: Any) -> None:  # called from the worker thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def deliver(self, records: list[Record], P: int, tok) -> int:
        """Emit the final texts (its rows are finished); returns the tokens they hold."""
        self.delivered = True
        if not self.cancelled.is_set():
            choices = [
                {
                    "text": r.fills[0] if self.template else r.text,
                    "tokens": len(r.token_ids),
                    "finish_reason": r.finish_reason,
                    "logprobs": None
                    if self.logprobs is None
                    else generated_logprobs(tok, r.token_ids, r.logprobs, self.logprobs),
                }
                for r in records
            ]
            self.emit(
                "done",
                {
                    "choices": choices,
                    "nfe": max(r.nfe for r in records),
                    "decode_seconds": max(r.seconds for r in records),
                    "batch_rows": records[0].batch_rows,
                    "prompt_tokens": P,
                },
            )
        return sum(len(r.token_ids) for r in records)

    def step_events(self, state, row: int, P: int, tok, mask: int) -> None:
        """Emit what a step makes final: `delta` text per row (a stop string that may still be
        forming is held back), and with `canvas` the whole canvas of its first row."""
        sent = self.sent
        stops = set(self.plan.stop_ids)
        hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may still be forming
        for i in range(self.n):
            ids = state.tokens[
                row + i, P : P + self.cfg.max_new_tokens
            ].tolist()  # the last block may overshoot
            final = mask not in ids
            committed = ids[: ids.index(mask)] if not final else ids
            cut = next((k for k, t in enumerate(committed) if t in stops), None)
            if cut is not None:
                committed = committed[:cut]
            text, stopped = cut_at_stop(tok.decode(committed), self.stop)
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                continue
            ready = text if stopped else text[: max(len(sent[i]), len(text) - hold)]
            if self.stream and len(ready) > len(sent[i]) and ready.startswith(sent[i]):
                self.emit("delta", (i, ready[len(sent[i]) :]))
                sent[i] = ready
        if self.canvas:
            ids = state.tokens[row, P : P + self.cfg.max_new_tokens].tolist()
            self.emit(
                "canvas",
                {
                    "step": state.step,
                    "block": state.block,
                    "nfe": state.nfe,
                    "pieces": [None if t == mask else tok.decode([t]) for t in ids],
                },
            )
