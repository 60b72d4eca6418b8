"""The serving engine: a bounded queue of decoding jobs in front of `generate()`, one worker thread
that batches them, and per-job event streams.

Batching keeps every row's output exactly what it would be alone: `generate()` is batch-invariant
when rows have the same prompt length and decoder settings and each row draws from its own random
stream (seeded by its request's seed and its sample index). So the worker takes the oldest waiting
job and every other waiting job with the same prompt length and `DecodeConfig`, up to
`max_batch_rows` rows, and decodes them as one batch; jobs that arrive meanwhile join the next
batch (at a batch boundary, not mid-batch). A job leaves as soon as its rows are finished (EOS, for
block-causal and AR models, whose rows stop at different blocks), not when the whole batch ends.
A job of `n` samples is `n` rows with sample indices 0..n-1: the same rows `unmask sample
--num-samples n --seed S` decodes.

Each job receives events on its own asyncio queue: `delta` (newly committed text of a row: for
block-causal models the finished blocks, for canvas decoding the left-to-right prefix that no later
step can change), `canvas` (the whole canvas of row 0 after a step, when asked for), and `done`.
A cancelled job (client gone, timeout) leaves the queue at once; if it is already decoding, its
rows finish with the batch and are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from unmask.config import DecodeConfig
from unmask.decoding.generate import completions
from unmask.decoding.rng import row_generators
from unmask.decoding.sample import cut_at_stop, decode_states
from unmask.schedules import build_schedule


class QueueFull(Exception):
    """The engine's queue holds `max_queue` waiting jobs."""


@dataclass
class Job:
    prompt_ids: list[int]
    cfg: DecodeConfig
    seed: int
    n: int
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    canvas: bool = False
    stop: tuple[str, ...] = ()
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        return (len(self.prompt_ids), self.cfg)

    def emit(self, kind: str, payload: Any) -> None:  # called from the worker thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


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
        self._cv = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="unmask-engine", daemon=True)
        self._worker.start()

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
                self._decode(batch)
            except Exception as e:  # a bug or an input we failed to validate: the jobs get a 500-free error
                for job in batch:
                    job.emit("error", f"{type(e).__name__}: {e}")
            finally:
                self.running_rows = 0

    def _decode(self, batch: list[Job]) -> None:
        cfg, P = batch[0].cfg, len(batch[0].prompt_ids)
        device = next(self.model.parameters()).device
        prompt = torch.tensor([j.prompt_ids for j in batch for _ in range(j.n)], device=device)
        generators = [g for j in batch for g in row_generators(j.seed, range(j.n))]
        starts = [sum(j.n for j in batch[:i]) for i in range(len(batch))]  # each job's first row
        sent = [[""] * j.n for j in batch]  # text already streamed, per job and row
        delivered = [False] * len(batch)
        t0 = time.perf_counter()
        state = None
        tokens = 0
        states = decode_states(
            self.model,
            cfg,
            prompt,
            schedule=self.schedule,
            generators=generators,
            eos_id=self.tok.eos_id,
            max_len=self.max_len,
            precision=self.precision,
        )
        for state in states:
            for j, job in enumerate(batch):
                rows = slice(starts[j], starts[j] + job.n)
                if delivered[j]:
                    continue
                if not job.cancelled.is_set() and (job.stream or job.canvas):
                    self._step_events(job, state, starts[j], P, sent[j])
                if bool(state.finished[rows].all()):  # its rows stopped: it leaves before the batch ends
                    tokens += self._deliver(job, state, rows, P, time.perf_counter() - t0)
                    delivered[j] = True
        seconds = time.perf_counter() - t0
        for j, job in enumerate(batch):
            if not delivered[j]:
                tokens += self._deliver(job, state, slice(starts[j], starts[j] + job.n), P, seconds)
        rows = state.tokens.shape[0]
        self.stats["batches"] += 1
        self.stats["rows"] += rows
        self.stats["tokens"] += tokens
        self.stats["nfe"] += state.nfe
        self.stats["decode_seconds"] += seconds
        if self.on_batch is not None:
            self.on_batch(tokens, state.nfe, seconds, rows)

    def _deliver(self, job: Job, state, rows: slice, P: int, seconds: float) -> int:
        """The job's final texts from `state` (its rows are finished there); returns their tokens."""
        outs = completions(state, self.tok.eos_id)[rows]
        if not job.cancelled.is_set():
            choices = []
            for ids in outs:
                text, stopped = cut_at_stop(self.tok.decode(ids), job.stop)
                hit_eos = len(ids) < job.cfg.max_new_tokens
                choices.append(
                    {
                        "text": text,
                        "tokens": len(ids),
                        "finish_reason": "stop" if stopped or hit_eos else "length",
                    }
                )
            job.emit(
                "done",
                {
                    "choices": choices,
                    "nfe": state.nfe,
                    "decode_seconds": seconds,
                    "batch_rows": state.tokens.shape[0],
                    "prompt_tokens": P,
                },
            )
        return sum(len(r) for r in outs)

    def _step_events(self, job: Job, state, row: int, P: int, sent: list[str]) -> None:
        mask = self.model.mask_id
        hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming
        for i in range(job.n):
            ids = state.tokens[
                row + i, P : P + job.cfg.max_new_tokens
            ].tolist()  # the last block may overshoot
            final = mask not in ids
            committed = ids[: ids.index(mask)] if not final else ids
            if self.tok.eos_id in committed:
                committed = committed[: committed.index(self.tok.eos_id)]
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
