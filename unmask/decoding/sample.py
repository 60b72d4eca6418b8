"""Sampling text: prompts in, JSON-ready records out, through the one `generate()` loop.

Sample `i` (counting across all prompts) draws from a generator seeded by `(seed, i)`, so its
text does not depend on `batch_size` or on the other samples. Prompts are encoded as
`[BOS] + tokens` and batched only with prompts of the same length (no padding, so batching never
changes a row's positions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from unmask.config import DecodeConfig
from unmask.data.corpus import DataError, read_jsonl
from unmask.data.tokenizer import Tokenizer
from unmask.decoding.generate import DecodeError, completions, generate
from unmask.decoding.presets import build_decoder
from unmask.decoding.refresh import build_refresher
from unmask.decoding.rng import row_generators
from unmask.decoding.state import DecodeState
from unmask.models.transformer import Transformer
from unmask.schedules import NoiseSchedule


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """`text` up to the earliest of the stop strings, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


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


def decode_states(
    model: Transformer,
    cfg: DecodeConfig,
    prompt: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    generators: list[torch.Generator],
    eos_id: int | None,
    max_len: int | None = None,
    precision: str = "fp32",
    sampler=None,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[DecodeState]:
    """The decode iterator `cfg` asks for: `generate()` with the preset's decoder and `cfg.rounds`
    commit rounds per forward, refreshed by `cfg.refresh` (`sampler`: a trained ADJUST `sampler`)."""
    try:
        refresher = build_refresher(cfg.refresh, sampler)
    except ValueError as e:
        raise DecodeError(str(e)) from None
    stops = tuple(stop_ids) or ((eos_id,) if eos_id is not None else ())
    return generate(
        model,
        build_decoder(cfg, schedule),
        prompt=prompt,
        max_new_tokens=cfg.max_new_tokens,
        steps=cfg.steps,
        block_len=cfg.block_len,
        cache=cfg.cache,
        eos_id=eos_id,
        eos_fill=cfg.eos_fill,
        stop_entropy=cfg.stop_entropy,
        max_len=max_len,
        generators=generators,
        precision=precision,
        cfg_scale=cfg.cfg_scale,
        ban_ids=stops if cfg.ban_stop else (),
        defer_ids=stops if cfg.defer_stop else (),
        rounds=cfg.rounds,
        refresher=refresher,
    )


def sample(
    model: Transformer,
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
) -> list[dict[str, Any]]:
    """`num_samples` completions of every prompt, as records with text, ids, NFE and timing.
    The `adjust` preset (`--decode.refresh sampler`) needs a trained `sampler` (ADJUST); `marginal`
    decodes `rounds` tokens per forward without one. `chat` wraps each prompt in the tokenizer's
    chat template (pretrained instruct models); completions stop at the tokenizer's first stop
    token (EOS, end of turn)."""
    if not prompts:
        raise DecodeError("no prompts given")
    if num_samples < 1 or batch_size < 1:
        raise DecodeError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    device = next(model.parameters()).device
    jobs = [
        (i, p, tokenizer.prompt_ids(p, chat=chat))
        for i, p in enumerate(q for q in prompts for _ in range(num_samples))
    ]
    records: dict[int, dict[str, Any]] = {}
    by_length = sorted(jobs, key=lambda j: (len(j[2]), j[0]))
    for _, group in groupby(by_length, key=lambda j: len(j[2])):
        group = list(group)
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            ids = torch.tensor([j[2] for j in chunk], device=device)
            t0 = time.perf_counter()
            state = None
            states = decode_states(
                model,
                cfg,
                ids,
                schedule=schedule,
                eos_id=tokenizer.eos_id,
                generators=row_generators(seed, [j[0] for j in chunk]),
                max_len=max_len,
                precision=precision,
                sampler=sampler,
                stop_ids=tokenizer.stop_ids,
            )
            for state in states:
                if on_state is not None:
                    on_state(state)
            seconds = time.perf_counter() - t0
            for (index, prompt, prompt_ids), out in zip(
                chunk, completions(state, tokenizer.stop_ids), strict=True
            ):
                records[index] = {
                    "index": index,
                    "prompt": prompt,
                    "text": tokenizer.decode(out),
                    "token_ids": out,
                    "prompt_tokens": len(prompt_ids),
                    "new_tokens": len(out),
                    "nfe": state.nfe,
                    "commit_passes": state.commit_passes,
                    "refresh_passes": state.refresh_passes,
                    "batch_seconds": seconds,
                    "batch_size": len(chunk),
                    "seed": seed,
                    "settings": asdict(cfg),
                }
    return [records[i] for i in sorted(records)]


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
