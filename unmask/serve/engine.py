"""The serving engine: a bounded queue of decoding jobs in front of `generate()`, one worker thread
that batches them, and per-job event streams.

Batching keeps every row's output exactly what it would be alone: `generate()` is batch-invariant
when rows have the same prompt length and decode plan and each row draws from its own random
stream (seeded by its request's seed and its sample index). So the worker takes the oldest waiting
job and every other waiting job with the same `batch_key` (prompt length, plan), up to
`max_batch_rows` rows, and decodes them as one batch through `decode_batch` (the driver `unmask
sample` and the lm-eval model use); jobs that arrive meanwhile join the next batch (at a batch
boundary, not mid-batch). A job leaves as soon as its rows are finished (a stop id, for
block-causal and AR models, whose rows stop at different blocks), not when the whole batch ends.
A job of `n` samples is `n` rows with sample indices 0..n-1: the same rows `unmask sample
--num-samples n --seed S` decodes.

Each job receives events on its own asyncio queue: `delta` (newly committed text of a row: for
block-causal models the finished blocks, for canvas decoding the left-to-right prefix that no later
step can change), `canvas` (the whole canvas of row 0 after a step, when asked for), and `done`.
A cancelled job (client gone, timeout) leaves the queue at once; if it is already decoding, the
batch stops at the next step once every job in it is cancelled (the worker moves on to the queue);
in a batch that other jobs still need, its rows decode on with them and are dropped (a static
batch cannot shed rows).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from unmask.decoding.batches import Record, Request, cut_at_stop, decode_batch
from unmask.decoding.plan import DecodePlan, plan_decode
from unmask.schedules import build_schedule
from unmask.serve.scoring import generated_logprobs

log = logging.getLogger("unmask.serve")


class QueueFull(Exception):
    """The engine's queue holds `max_queue` waiting jobs."""


class _Abandoned(Exception):
    """Every job of the running batch was cancelled (timed out, client gone): stop decoding it."""


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


@dataclass(frozen=True)
class Scored:
    logprobs: Any  # [n] float64 tensor (position 0: nan)
    top_ids: Any  # [n, k]
    top_logprobs: Any  # [n, k]
    next: tuple[int, float] | None  # the likeliest next token and its log-probability
    nfe: int  # forward passes spent


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        config,
        *,
        max_queue: int = 64,
        max_batch_rows: int = 32,
        precision: str = "auto",
    ):
        self.model, self.tok, self.config = model, tokenizer, config
        self.schedule = build_schedule(config.noise.schedule, config.noise.eps)
        self.max_len = config.data.seq_len if model.cfg.attention == "bidirectional" else None
        self.max_queue, self.max_batch_rows, self.precision = max_queue, max_batch_rows, precision
        self.waiting: collections.deque[Job] = collections.deque()
        self.running_rows = 0
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "nfe": 0, "decode_seconds": 0.0}
        self.on_batch = None  # callback(tokens, nfe, seconds, rows) for metrics
        self.on_queued = None  # callback(seconds a job waited before its batch started)
        self._cv = threading.Condition()
        self.model_lock = threading.Lock()  # decoding batches and scoring take turns on the model
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="unmask-engine", daemon=True)
        self._worker.start()

    def plan(self, cfg) -> DecodePlan:
        """The decode plan of a request's settings on this model (a DecodeError names the field)."""
        return plan_decode(
            self.model,
            cfg,
            schedule=self.schedule,
            tokenizer=self.tok,
            max_len=self.max_len,
            precision=self.precision,
        )

    # -------------------------------------------------------------------------------- jobs

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._cv:
            if job in self.waiting:
                self.waiting.remove(job)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, let the running batch finish."""
        with self._cv:
            self._stopping = True
            for job in self.waiting:
                job.cancelled.set()
                job.emit("error", "the server is shutting down")
            self.waiting.clear()
            self._cv.notify_all()
        self._worker.join(timeout)

    def score(self, prompts: list[list[int]], *, k: int = 1, next_token: bool = False) -> list[Scored]:
        """Each prompt's chain-rule log-probabilities and top-k (see evaluation/chain), and with
        `next_token` the likeliest next token; run in the caller's thread, between batches."""
        from unmask.evaluation.chain import ROWS, chain_logprobs, greedy_next

        out = []
        with self.model_lock:
            for ids in prompts:
                scores = chain_logprobs(
                    self.model, ids, pad_id=self.tok.pad_id, k=k, precision=self.precision
                )
                nxt = (
                    greedy_next(self.model, ids, pad_id=self.tok.pad_id, precision=self.precision)
                    if next_token
                    else None
                )
                kind = self.model.cfg.attention
                nfe = (1 if kind == "causal" else -(-(len(ids) - 1) // ROWS)) + (nxt is not None)
                out.append(Scored(scores.logprobs, scores.top_ids, scores.top_logprobs, nxt, nfe))
        return out

    # ------------------------------------------------------------------------------ worker

    def _next_batch(self) -> list[Job]:
        first = self.waiting.popleft()
        batch, rows = [first], first.n
        for job in list(self.waiting):
            if job.key == first.key and rows + job.n <= self.max_batch_rows:
                self.waiting.remove(job)
                batch.append(job)
                rows += job.n
        return batch

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self.waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self.waiting:
                    return
                batch = self._next_batch()
                self.running_rows = sum(j.n for j in batch)
            try:
                with self.model_lock:
                    self._isolated(batch)
            finally:
                self.running_rows = 0

    def _isolated(self, batch: list[Job]) -> None:
        """Decode a batch; if it fails, each unfinished job again alone (outputs do not depend on the
        batch, and text already streamed is not sent twice), so only a job that fails alone fails."""
        try:
            self._decode(batch)
            return
        except _Abandoned:
            log.info("a batch of %d cancelled job(s) stopped mid-decode", len(batch))
            return
        except Exception:
            if len(batch) == 1:
                self._fail(batch[0])
                return
            log.exception("a batch of %d jobs failed; decoding each alone", len(batch))
        for job in batch:
            if job.delivered or job.cancelled.is_set():
                continue
            try:
                self._decode([job])
            except _Abandoned:
                continue
            except Exception:
                self._fail(job)

    def _fail(self, job: Job) -> None:
        rid = uuid.uuid4().hex[:12]
        log.exception("decoding failed (request id %s; prompt of %d tokens, plan %s)", rid,
                      len(job.prompt_ids), job.plan.cfg)  # fmt: skip
        job.delivered = True
        job.emit("failed", rid)

    def _decode(self, batch: list[Job]) -> None:
        P = len(batch[0].prompt_ids)
        starts = [sum(j.n for j in batch[:i]) for i in range(len(batch))]  # each job's first row
        records: dict[int, list[Record | None]] = {id(j): [None] * j.n for j in batch}
        t0 = time.perf_counter()
        tokens, nfe, rows = 0, 0, sum(j.n for j in batch)

        for job in batch:
            if self.on_queued is not None:
                self.on_queued(t0 - job.submitted)

        def on_state(requests, state) -> None:
            if all(job.cancelled.is_set() for job in batch):
                raise _Abandoned  # every client left: this step is the batch's last
            for j, job in enumerate(batch):
                if job.template or job.cancelled.is_set() or None not in records[id(job)]:
                    continue  # fill-in-the-middle answers arrive whole
                if job.stream or job.canvas:
                    self._step_events(job, state, starts[j], P, job.sent)

        wanted = [j.logprobs for j in batch if j.logprobs is not None]
        for record in decode_batch(
            self.model,
            [r for job in batch for r in job.requests()],
            on_state=on_state,
            logprobs=max(wanted) if wanted else None,
        ):
            job, i = record.request.tag
            records[id(job)][i] = record
            nfe = max(nfe, record.nfe)
            if None not in records[id(job)]:  # its rows stopped: it leaves before the batch ends
                tokens += self._deliver(job, records[id(job)], P)
        seconds = time.perf_counter() - t0
        self.stats["batches"] += 1
        self.stats["rows"] += rows
        self.stats["tokens"] += tokens
        self.stats["nfe"] += nfe
        self.stats["decode_seconds"] += seconds
        if self.on_batch is not None:
            self.on_batch(tokens, nfe, seconds, rows)

    def _deliver(self, job: Job, records: list[Record], P: int) -> int:
        """The job's final texts (its rows are finished); returns the tokens they hold."""
        job.delivered = True
        if not job.cancelled.is_set():
            choices = [
                {
                    "text": r.fills[0] if job.template else r.text,
                    "tokens": len(r.token_ids),
                    "finish_reason": r.finish_reason,
                    "logprobs": None
                    if job.logprobs is None
                    else generated_logprobs(self.tok, r.token_ids, r.logprobs, job.logprobs),
                }
                for r in records
            ]
            job.emit(
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

    def _step_events(self, job: Job, state, row: int, P: int, sent: list[str]) -> None:
        mask = self.model.mask_id
        stops = set(job.plan.stop_ids)
        hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming
        for i in range(job.n):
            ids = state.tokens[
                row + i, P : P + job.cfg.max_new_tokens
            ].tolist()  # the last block may overshoot
            final = mask not in ids
            committed = ids[: ids.index(mask)] if not final else ids
            cut = next((k for k, t in enumerate(committed) if t in stops), None)
            if cut is not None:
                committed = committed[:cut]
            text, stopped = cut_at_stop(self.tok.decode(committed), job.stop)
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                continue
            ready = text if stopped else text[: max(len(sent[i]), len(text) - hold)]
            if job.stream and len(ready) > len(sent[i]) and ready.startswith(sent[i]):
                job.emit("delta", (i, ready[len(sent[i]) :]))
                sent[i] = ready
        if job.canvas:
            ids = state.tokens[row, P : P + job.cfg.max_new_tokens].tolist()
            job.emit(
                "canvas",
                {
                    "step": state.step,
                    "block": state.block,
                    "nfe": state.nfe,
                    "pieces": [None if t == mask else self.tok.decode([t]) for t in ids],
                },
            )
