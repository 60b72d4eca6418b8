"""The serving engine: a bounded queue of decoding jobs, one worker thread that decodes every
running job a step at a time with shared forward passes, and per-job event streams.

Continuous batching. Each running job is a *lane*: the decode `unmask sample` runs (`decode_batch`
-> `generate()`) over the job's rows, in a greenlet, seeing the model through a `LaneModel`
(`serve/shared_forward`). The worker runs rounds: it resumes every lane until its next model call
(or its end), then runs the round's calls as shared forwards (rows of every prompt length, block,
canvas and decoder setting in one pass: right-padded with key masks, cached rows through a
`RaggedCache` at their own positions) and hands each lane its output. A step's decision (propose ->
score -> select on the active window) is shared too: lanes with the same decoding policies hand
their windows to the engine, which decides them stacked in one call, whatever their positions and
step counters (`serve/shared_steps`). Rounds, refreshers, caches, input policies and the loop
itself stay the lane's own, as in `unmask sample`. A job joins at the next round (the next step,
for every model kind) and leaves with its last state, its rows freed for the next job. Since the
shared forward and the shared decision are batch-invariant (each row's output equals its output
alone) and each row draws from its own random stream (seeded by its request's seed and sample
index), every response is what the request gives alone.

Scheduling: first come first served. The oldest waiting job is admitted when its rows fit under
`max_batch_rows` beside the running lanes (with every same-settings job waiting behind it that fits:
they share the lane, as in `unmask sample --batch-size`); no later job overtakes it, so none
starves. A round's calls are split into forwards of at most `max_batch_tokens` padded positions
(a narrower canvas pads into a wider forward while its padding costs less than a forward of its
own, by a cost model fitted to the engine's own forwards, `shared_forward.ForwardCost`; cached calls
pad within a factor `shared_forward.SPREAD` of their width).
`batching="static"` is the engine before continuous batching, kept for comparison (`unmask
bench serve`): one lane at a time, of same-prompt-length, same-settings jobs. A job of `n` samples
is `n` rows with sample indices 0..n-1: the rows `unmask sample --num-samples n --seed S` decodes.

Each job receives events on its own asyncio queue: `delta` (newly committed text of a row: for
block-causal models the finished blocks, for canvas decoding the left-to-right prefix that no later
step can change), `canvas` (the whole canvas of row 0 after a step, when asked for), and `done`.
A cancelled job (client gone, timeout) leaves the queue at once; if it is running, its lane stops
at its next step once every job in it is cancelled.
A failed shared forward is run again call by call, so only the lane whose own call fails sees the
error; a failing lane fails its own jobs (each retried alone first), never another lane.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import greenlet
import torch

from unmask.decoding.batches import Record, decode_batch
from unmask.decoding.plan import DecodePlan, plan_decode
from unmask.models.transformer import autocast
from unmask.schedules import build_schedule
from unmask.serve.jobs import Job
from unmask.serve.shared_forward import Call, ForwardCost, LaneModel, buckets, run_shared
from unmask.serve.shared_steps import LaneDecoder, StepCall, run_steps, step_groups

BATCHING = ("continuous", "static")

log = logging.getLogger("unmask.serve")


class QueueFull(Exception):
    """The engine's queue holds `max_queue` waiting jobs."""


class _Abandoned(Exception):
    """Every job of the running batch was cancelled (timed out, client gone): stop decoding it."""


@dataclass(eq=False)
class Lane:
    """Running jobs that share their rows' decode (one `decode_batch`), suspended at a model call
    or at a step's decision."""

    jobs: list[Job]
    run: greenlet.greenlet
    call: Call | StepCall | None = None  # the call it waits on
    reply: Any = None  # what it resumes with: the call's output, or an exception to raise there

    @property
    def rows(self) -> int:
        return sum(j.n for j in self.jobs)


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
        max_batch_tokens: int = 16384,
        precision: str = "auto",
        batching: str = "continuous",
    ):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if max_batch_rows < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch_rows and max_batch_tokens must be >= 1, got {max_batch_rows}, "
                             f"{max_batch_tokens}")  # fmt: skip
        self.model, self.tok, self.config = model, tokenizer, config
        self.schedule = build_schedule(config.noise.schedule, config.noise.eps)
        self.max_len = config.data.seq_len if model.cfg.attention == "bidirectional" else None
        self.max_queue, self.max_batch_rows, self.precision = max_queue, max_batch_rows, precision
        self.max_batch_tokens, self.batching = max_batch_tokens, batching
        self.device = next(model.parameters()).device
        self.waiting: collections.deque[Job] = collections.deque()
        self.lanes: list[Lane] = []
        self.cost = ForwardCost()  # fitted to the forwards below: how freely calls pad
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "nfe": 0, "decode_seconds": 0.0,
                      "forwards": 0, "forward_rows": 0, "forward_calls": 0, "forward_seconds": 0.0,
                      "round_seconds": 0.0, "steps": 0, "step_rows": 0, "step_calls": 0,
                      "step_seconds": 0.0}  # fmt: skip
        self.on_batch = None  # callback(tokens, nfe, seconds, rows) when a lane ends, for metrics
        self.on_forward = None  # callback(rows, positions, seconds) after each shared forward
        self.on_queued = None  # callback(seconds a job waited before its lane started)
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

    @property
    def running_rows(self) -> int:
        return sum(lane.rows for lane in self.lanes)

    def _next_batch(self, room: int) -> list[Job]:
        """The oldest waiting job and the same-settings jobs behind it that fit in `room` rows."""
        first = self.waiting.popleft()
        batch, rows = [first], first.n
        for job in list(self.waiting):
            if job.key == first.key and rows + job.n <= room:
                self.waiting.remove(job)
                batch.append(job)
                rows += job.n
        return batch

    def _admit(self) -> None:
        """Start lanes for waiting jobs, oldest first, while their rows fit (under `_cv`). A job
        larger than the budget runs when nothing else does."""
        while self.waiting:
            running = self.running_rows
            if self.lanes and (
                self.batching == "static" or running + self.waiting[0].n > self.max_batch_rows
            ):
                return
            jobs = self._next_batch(max(self.max_batch_rows - running, self.waiting[0].n))
            self.lanes.append(Lane(jobs, greenlet.greenlet(lambda jobs=jobs: self._isolated(jobs))))

    def _work(self) -> None:
        with torch.inference_mode(), autocast(self.precision, self.device):  # the lanes' own modes
            while True:
                with self._cv:
                    while not self.waiting and not self.lanes and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self.waiting and not self.lanes:
                        return
                    self._admit()
                with self.model_lock:
                    self._round()

    def _round(self) -> None:
        """Every lane to its next model call (or its end), its steps' decisions shared on the way;
        then the calls as shared forwards."""
        t0 = time.perf_counter()
        resume = list(self.lanes)
        while resume:
            for lane in resume:
                self._resume(lane)
            resume = [lane for lane in self.lanes if isinstance(lane.call, StepCall)]
            by_call = {id(lane.call): lane for lane in resume}
            for group in step_groups([lane.call for lane in resume]):
                self._step(group, [by_call[id(c)] for c in group])
        waiting = {id(lane.call): lane for lane in self.lanes if isinstance(lane.call, Call)}
        for bucket in buckets([lane.call for lane in waiting.values()], self.max_batch_tokens, self.cost):
            self._forward(bucket, [waiting[id(c)] for c in bucket])
        self.stats["round_seconds"] += time.perf_counter() - t0

    def _resume(self, lane: Lane) -> None:
        """Run `lane` with its reply until its next call; a lane that ends leaves."""
        reply, lane.reply, lane.call = lane.reply, None, None
        if not lane.run:  # not started
            call = lane.run.switch()
        elif isinstance(reply, BaseException):
            call = lane.run.throw(reply)
        else:
            call = lane.run.switch(reply)
        if lane.run.dead:
            self.lanes.remove(lane)
        else:
            lane.call = call

    def _step(self, calls: list[StepCall], lanes: list[Lane]) -> None:
        """One shared decision for a group of steps."""
        t0 = time.perf_counter()
        if not self._reply(run_steps, calls, lanes, "step"):
            return
        self.stats["steps"] += 1
        self.stats["step_rows"] += sum(c.rows for c in calls)
        self.stats["step_calls"] += len(calls)
        self.stats["step_seconds"] += time.perf_counter() - t0

    def _reply(self, run, calls: list, lanes: list[Lane], what: str) -> bool:
        """Each lane's reply from `run(calls)` (one output per call); if that fails, from each call
        run alone, so only a call that fails alone hands its lane the error. False: a lone call failed."""
        try:
            outs = run(calls)
        except Exception as e:
            if len(calls) == 1:
                lanes[0].reply = e
                return False
            log.exception("a shared %s of %d calls failed; running each alone", what, len(calls))
            outs = []
            for call in calls:
                try:
                    outs.append(run([call])[0])
                except Exception as err:  # only this call's lane sees it
                    outs.append(err)
        for lane, out in zip(lanes, outs, strict=True):
            lane.reply = out
        return True

    def _forward(self, calls: list[Call], lanes: list[Lane]) -> None:
        t0 = time.perf_counter()
        if not self._reply(lambda calls: run_shared(self.model, calls), calls, lanes, "forward"):
            return
        seconds = time.perf_counter() - t0
        rows = sum(c.rows for c in calls)
        if calls[0].cache is None and calls[0].own is None:  # the canvases' cost model (see `buckets`)
            self.cost.observe(rows, max(c.width for c in calls), seconds)
        self.stats["forwards"] += 1
        self.stats["forward_rows"] += rows
        self.stats["forward_calls"] += len(calls)
        self.stats["forward_seconds"] += seconds
        if self.on_forward is not None:
            self.on_forward(rows, rows * max(c.width for c in calls), seconds)

    def _isolated(self, batch: list[Job]) -> None:
        """A lane's body: decode its jobs; if that fails, each unfinished job again alone (outputs
        do not depend on the batch, and text already streamed is not sent twice), so only a job
        that fails alone fails."""
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
            job.started = job.started or t0
            if self.on_queued is not None:
                self.on_queued(t0 - job.submitted)

        def on_state(requests, state) -> None:
            if all(job.cancelled.is_set() for job in batch):
                raise _Abandoned  # every client left: this step is the batch's last
            for j, job in enumerate(batch):
                if job.template or job.cancelled.is_set() or None not in records[id(job)]:
                    continue  # fill-in-the-middle answers arrive whole
                if job.stream or job.canvas:
                    job.step_events(state, starts[j], P, self.tok, self.model.mask_id)

        wanted = [j.logprobs for j in batch if j.logprobs is not None]
        requests = [r for job in batch for r in job.requests()]
        if self.batching == "continuous":  # its steps' decisions are shared with other lanes'
            plan = dataclasses.replace(batch[0].plan, decoder=LaneDecoder(batch[0].plan.decoder))
            requests = [dataclasses.replace(r, plan=plan) for r in requests]
        for record in decode_batch(
            LaneModel(self.model),
            requests,
            on_state=on_state,
            logprobs=max(wanted) if wanted else None,
        ):
            job, i = record.request.tag
            records[id(job)][i] = record
            nfe = max(nfe, record.nfe)
            if None not in records[id(job)]:  # its rows stopped: it leaves before the batch ends
                tokens += job.deliver(records[id(job)], P, self.tok)
        seconds = time.perf_counter() - t0
        self.stats["batches"] += 1
        self.stats["rows"] += rows
        self.stats["tokens"] += tokens
        self.stats["nfe"] += nfe
        self.stats["decode_seconds"] += seconds
        if self.on_batch is not None:
            self.on_batch(tokens, nfe, seconds, rows)
