"""Sampling text: prompts in, JSON-ready records out, through the one batching driver.

Sample `i` (counting across all prompts) draws from a generator seeded by `(seed, i)`, so its
text does not depend on `batch_size` or on the other samples. Prompts are encoded as the model is
fed (`[BOS] + tokens`, or the chat template with `chat`) and batched only with prompts of the same
length (no padding, so batching never changes a row's positions). With `infill`, each prompt is a
template with `<mask>` / `<mask*N>` slots that a bidirectional model fills in place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from unmask.config import DecodeConfig
from unmask.data.corpus import DataError, read_jsonl
from unmask.data.tokenizer import Tokenizer
from unmask.decoding.batches import Request, cut_at_stop, decode_batches  # noqa: F401 - cut_at_stop re-exported
from unmask.decoding.plan import DecodeError, plan_decode
from unmask.decoding.state import DecodeState
from unmask.models.denoiser import Denoiser
from unmask.schedules import NoiseSchedule

MASK_GLYPH = "░"


def render(state: DecodeState, tokenizer: Tokenizer, row: int = 0) -> str:
    """The row's canvas as text, still-masked positions shown as a shaded block."""
    ids = state.tokens[row, state.prompt_len :].tolist()
    out, run = [], []
    for t in ids:
        if t == tokenizer.mask_id:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(MASK_GLYPH)
        else:
            run.append(t)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


def sample(
    model: Denoiser,
    tokenizer: Tokenizer,
    prompts: list[str],
    cfg: DecodeConfig,
    schedule: NoiseSchedule,
    *,
    num_samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    max_len: int | None = None,
    precision: str = "fp32",
    on_state: Callable[[DecodeState], None] | None = None,
    sampler=None,
    chat: bool = False,
    infill: bool = False,
    finished: list[dict[str, Any]] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """`num_samples` completions of every prompt, as records with text, ids, finish reason, NFE and
    timing. The `adjust` preset (`--decode.refresh sampler`) needs a trained `sampler` (ADJUST);
    `marginal` decodes `rounds` tokens per forward without one. `chat` wraps each prompt in the
    model's chat template (the tokenizer's for pretrained chat models, the repo's `chat` template for
    our own); completions stop at the plan's stop ids (EOS, end of turn). `infill`: each prompt is
    a template whose `<mask>` / `<mask*N>` slots are filled (bidirectional models); a record's
    `text` is the whole filled text and `fills` each slot's. `finished`: a list that receives
    each record as it is done (what an interrupted caller can still save)."""
    if not prompts:
        raise DecodeError("no prompts given")
    if num_samples < 1 or batch_size < 1:
        raise DecodeError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    if chat and infill:
        raise DecodeError("--chat and --infill do not combine: an infill template is the whole text")
    plan = plan_decode(
        model,
        cfg,
        schedule=schedule,
        tokenizer=tokenizer,
        max_len=max_len,
        precision=precision,
        sampler=sampler,
    )
    texts = [p for p in prompts for _ in range(num_samples)]
    requests = []
    for i, text in enumerate(texts):
        ids = plan.infill_ids(text) if infill else plan.prompt_ids(text, chat=chat)
        plan.check_length(len(ids), template=infill)
        requests.append(Request(ids, plan, seed=seed, index=i, template=infill, tag=text))
    watch = None if on_state is None else (lambda batch, state: on_state(state))
    done = [] if finished is None else finished
    with tqdm(total=len(requests), desc="sample", unit="sample", disable=not progress, leave=False) as bar:
        for record in decode_batches(model, requests, batch_size=batch_size, on_state=watch):
            done.append(record.json())  # `finished` holds what is done if the caller is interrupted
            bar.update(1)
    return sorted(done, key=lambda r: r["index"])


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Records of a samples JSONL file (each with a string `text`); clear errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--samples: no such file {path}")
    records = [record for _, record in read_jsonl(path, "text")]
    if not records:
        raise DataError(f"{path} holds no samples")
    return records


def sample_token_ids(records: list[dict[str, Any]], tokenizer: Tokenizer | None) -> list[list[int]]:
    """Token ids of each record: its stored `token_ids` (checked against `tokenizer` when given:
    they must decode to the record's text), else the text encoded with `tokenizer`."""
    out = []
    for i, rec in enumerate(records):
        ids = rec.get("token_ids")
        if ids is None:
            if tokenizer is None:
                raise DataError(f"sample {i} has no `token_ids`; pass --checkpoint to tokenize its text")
            ids = tokenizer.encode(rec["text"])
        elif tokenizer is not None and tokenizer.decode(ids) != rec["text"]:
            raise DataError(
                f"sample {i}: its token_ids do not decode to its text with this tokenizer "
                "(the samples were made with a different tokenizer)"
            )
        out.append(list(ids))
    return out
