"""`decode_batches`: decode requests in batches, the one driver behind every caller.

`unmask sample`, the serving engine, the lm-eval model, the benchmarks, the reproductions and
ADJUST's trajectory recording all turn prompts into records here: requests -> batches of rows that
may share one (the same plan and the same prompt length: no padding, so batching never moves a
row's positions) -> `generate()` -> one `Record` per request with its text, token ids, finish
reason and NFE. A record leaves as soon as its row is finished (a block-causal or AR row stops at
its own block), not when the batch ends.

Request `i` draws from the generator seeded by `(seed, index)`, so its tokens do not depend on the
batch size or on its batch-mates (`generate()` is batch-invariant by construction).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from unmask.decoding.generate import completions, generate  # noqa: F401 - completions re-exported
from unmask.decoding.plan import DecodePlan
from unmask.decoding.rng import row_generators
from unmask.decoding.state import DecodeState
from unmask.models.denoiser import Denoiser


@dataclass(frozen=True, eq=False)
class Request:
    """One row to decode."""

    ids: list[int]  # the prompt (or, with `template`, a canvas with [MASK]s to fill)
    plan: DecodePlan
    seed: int = 0
    index: int = 0  # the sample index: the row's random stream is seeded by (seed, index)
    template: bool = False
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first of them
    tag: Any = None  # the caller's own (a prompt string, a job), carried into the record

    @property
    def batch_key(self) -> tuple:
        return (len(self.ids), self.template, self.plan)


@dataclass
class Record:
    """A decoded request: what is returned (text and the ids it came from) and what it cost."""

    request: Request
    text: str
    token_ids: list[int]  # the returned ids: before the first stop id and the first stop string
    finish_reason: str  # "stop" (a stop id or string) | "length" (the budget ran out)
    nfe: int
    commit_passes: int
    refresh_passes: int
    seconds: float  # since its batch started
    batch_rows: int
    fills: list[str] = field(default_factory=list)  # templates: each hole's text, left to right
    # with `logprobs`: per returned id, (log p when committed, [(id, log p)] the top k then)
    logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None

    def json(self) -> dict[str, Any]:
        """The JSON-ready fields `unmask sample` writes."""
        req = self.request
        out = {
            "index": req.index,
            "prompt": req.tag if isinstance(req.tag, str) else None,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(req.ids),
            "new_tokens": len(self.token_ids),
            "nfe": self.nfe,
            "commit_passes": self.commit_passes,
            "refresh_passes": self.refresh_passes,
            "batch_seconds": self.seconds,
            "batch_size": self.batch_rows,
            "seed": req.seed,
            "settings": asdict(req.plan.cfg),
        }
        if req.template:
            out["fills"] = self.fills
        return out


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """`text` up to the earliest of the stop strings, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def batches(requests: Iterable[Request], batch_size: int) -> list[list[Request]]:
    """Requests grouped by what may share a batch (plan, prompt length, prompt or template), in
    order of first appearance, in chunks of at most `batch_size` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple, list[Request]] = {}
    for req in requests:
        groups.setdefault(req.batch_key, []).append(req)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def decode_batches(
    model: Denoiser,
    requests: Iterable[Request],
    *,
    batch_size: int = 8,
    on_state: Callable[[list[Request], DecodeState], None] | None = None,
) -> Iterator[Record]:
    """A record per request, each as soon as its row is finished. `on_state(batch, state)` sees
    every state of every batch (live rendering, streaming)."""
    for batch in batches(requests, batch_size):
        yield from decode_batch(model, batch, on_state=on_state)


class CommitLogprobs:
    """Watches a batch's states: the log-probability each token had in the step that committed it
    (the model's distribution at that step, [MASK] excluded for diffusion models), and the top k.
    Read from the logits the step used (`prev_logits`); a token committed without them (a stop's
    fill) has none."""

    def __init__(self, k: int, causal: bool):
        self.k, self.causal = k, causal
        self.prev: torch.Tensor | None = None  # [B, T] tokens of the last state
        self.last_logits = None
        self.lp: torch.Tensor | None = None  # [B, T] float64, nan where unknown
        self.top_ids: torch.Tensor | None = None  # [B, T, k]
        self.top_lp: torch.Tensor | None = None

    def __call__(self, state: DecodeState) -> None:
        tokens = state.tokens.cpu()
        B, T = tokens.shape
        if self.lp is None or self.lp.shape[1] < T:  # the canvas grew (blocks, AR tokens)
            grow = T - (0 if self.lp is None else self.lp.shape[1])
            nan = torch.full((B, grow), float("nan"), dtype=torch.float64)
            self.lp = nan if self.lp is None else torch.cat([self.lp, nan], 1)
            ids = torch.full((B, grow, self.k), -1, dtype=torch.long)
            self.top_ids = ids if self.top_ids is None else torch.cat([self.top_ids, ids], 1)
            vals = torch.full((B, grow, self.k), float("nan"), dtype=torch.float64)
            self.top_lp = vals if self.top_lp is None else torch.cat([self.top_lp, vals], 1)
        prev = tokens.new_full((B, T), state.mask_id)
        if self.prev is not None:
            n = min(T, self.prev.shape[1])
            prev[:, :n] = self.prev[:, :n]
        logits, fresh = state.prev_logits, state.prev_logits is not self.last_logits
        self.prev, self.last_logits = tokens, state.prev_logits
        lo, hi = state.window
        new = (prev == state.mask_id) & (tokens != state.mask_id) & ~state.fixed.cpu()
        new[:, :lo] = False
        new[:, hi:] = False
        if logits is None or not fresh or not new.any():
            return
        rows, cols = new.nonzero(as_tuple=True)
        picked = logits[rows.to(logits.device), (cols - lo).to(logits.device)].float()  # [N, V]
        if not self.causal:
            picked[:, state.mask_id] = -torch.inf
        lsm = picked.log_softmax(-1).cpu()
        self.lp[rows, cols] = lsm.gather(-1, tokens[rows, cols][:, None]).squeeze(-1).double()
        values, indices = lsm.topk(self.k, dim=-1)
        self.top_ids[rows, cols], self.top_lp[rows, cols] = indices, values.double()

    def of(self, row: int, start: int, n: int) -> list[tuple[float | None, list[tuple[int, float]]]]:
        out = []
        for c in range(start, start + n):
            value = float(self.lp[row, c])
            top = [
                (int(i), float(v))
                for i, v in zip(self.top_ids[row, c], self.top_lp[row, c], strict=True)
                if i >= 0
            ]
            out.append((None if value != value else value, top))
        return out


def decode_batch(
    model: Denoiser,
    batch: list[Request],
    *,
    on_state: Callable[[list[Request], DecodeState], None] | None = None,
    logprobs: int | None = None,
) -> Iterator[Record]:
    """One batch of requests that share a `batch_key`; with `logprobs` k, each record carries its
    tokens' log-probabilities when committed and the top k (`CommitLogprobs`)."""
    first = batch[0]
    if any(r.batch_key != first.batch_key for r in batch):
        raise ValueError("decode_batch: requests of one batch need the same plan and prompt length")
    device = next(model.parameters()).device
    ids = torch.tensor([r.ids for r in batch], dtype=torch.long, device=device)
    generators = [row_generators(r.seed, [r.index])[0] for r in batch]
    given = {"template": ids} if first.template else {"prompt": ids}
    t0 = time.perf_counter()
    done = [False] * len(batch)
    state = None
    watch = (
        CommitLogprobs(max(logprobs, 1), model.cfg.attention == "causal") if logprobs is not None else None
    )
    for state in generate(model, first.plan, generators=generators, **given):
        if on_state is not None:
            on_state(batch, state)
        if watch is not None:
            watch(state)
        finished = state.finished.tolist()
        for r, req in enumerate(batch):
            if finished[r] and not done[r]:
                done[r] = True
                yield _record(req, state, r, time.perf_counter() - t0, len(batch), watch)
    for r, req in enumerate(batch):
        if not done[r]:
            yield _record(req, state, r, time.perf_counter() - t0, len(batch), watch)


def _record(req: Request, state: DecodeState, row: int, seconds: float, rows: int, watch=None) -> Record:
    plan, tok = req.plan, req.plan.tokenizer
    costs = dict(nfe=state.nfe, commit_passes=state.commit_passes, refresh_passes=state.refresh_passes)
    if req.template:
        holes = ~state.fixed[row]
        filled = state.tokens[row].tolist()
        ids = [t for t, h in zip(filled, holes.tolist(), strict=True) if h]
        fills, run = [], []
        for t, h in zip(filled, holes.tolist(), strict=True):
            if h:
                run.append(t)
            elif run:
                fills.append(run)
                run = []
        if run:
            fills.append(run)
        text = tok.decode(filled) if tok is not None else ""
        fill_texts = [tok.decode(f) for f in fills] if tok is not None else []
        return Record(req, text, ids, "stop", **costs, seconds=seconds, batch_rows=rows, fills=fill_texts)
    generated = state.tokens[row, state.prompt_len : state.prompt_len + plan.cfg.max_new_tokens].tolist()
    stops = set(plan.stop_ids)
    cut = next((i for i, t in enumerate(generated) if t in stops), None)
    ids = generated if cut is None else generated[:cut]
    reason = "stop" if cut is not None else "length"
    text = tok.decode(ids) if tok is not None else ""
    if req.stop:
        text, stopped = cut_at_stop(text, req.stop)
        if stopped:
            ids, reason = _ids_for(tok, ids, text), "stop"
    lps = watch.of(row, state.prompt_len, len(ids)) if watch is not None else None
    return Record(req, text, ids, reason, **costs, seconds=seconds, batch_rows=rows, logprobs=lps)


def _ids_for(tok, ids: list[int], text: str) -> list[int]:
    """The shortest prefix of `ids` whose text covers `text` (a prefix of their decoded text): the
    tokens a stop string leaves in the answer, which `usage.completion_tokens` counts."""
    lo, hi = 0, len(ids)
    while lo < hi:  # the decoded length grows with the prefix
        mid = (lo + hi) // 2
        if len(tok.decode(ids[:mid])) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo]
