"""The scoring side of the API: OpenAI's legacy `logprobs` object, the answer to an `echo` request
(each prompt token's chain-rule log-probability, see `unmask.evaluation.chain`), and vLLM's
tokenizer endpoints that lm-eval's `local-completions` uses when a server has them."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from unmask.serve.api import APIError, decode_settings


def logprobs_object(tokens: list[str], values: list, tops: list, first_offset: int = 0) -> dict[str, Any]:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` for tokens in text order."""
    offsets, at = [], first_offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def generated_logprobs(tok, token_ids: list[int], logprobs, k: int) -> dict[str, Any]:
    """The object for a completion's tokens: each one's log-probability when it was committed and,
    for k > 0, the top k then (`Record.logprobs`)."""
    tokens = [tok.decode([t], skip_special=False) for t in token_ids]
    pairs = logprobs or [(None, [])] * len(tokens)
    tops = [{tok.decode([i], skip_special=False): v for i, v in top[:k]} if k else None for _, top in pairs]
    return logprobs_object(tokens, [v for v, _ in pairs], tops)


def echo_choice(tok, prompt: str | list[int], ids: list[int], scored, index: int, logprobs: bool) -> dict:
    """One `echo` choice: the prompt as the client gave it (text, or its own token ids, without
    the [BOS] the server put in front), with max_tokens 1 the likeliest next token after it, and
    with `logprobs` every token's log-probability (the first one's is None when nothing precedes it)."""
    own = isinstance(prompt, list) and prompt[:1] == [tok.bos_id]
    shown = ids if own else ids[1:]  # the client's tokens
    lo = len(ids) - len(shown)
    text = prompt if isinstance(prompt, str) else tok.decode(shown, skip_special=False)
    tokens = [tok.decode([t], skip_special=False) for t in shown]
    values = [None if i == 0 else float(scored.logprobs[i]) for i in range(lo, len(ids))]
    tops = [
        None if i == 0 else {tok.decode([int(t)], skip_special=False): float(v)
                             for t, v in zip(scored.top_ids[i], scored.top_logprobs[i], strict=True)}
        for i in range(lo, len(ids))
    ]  # fmt: skip
    first = len(text) - len("".join(tokens))
    if scored.next is not None:
        piece = tok.decode([scored.next[0]], skip_special=False)
        tokens, values, tops, text = (
            [*tokens, piece],
            [*values, scored.next[1]],
            [*tops, {piece: scored.next[1]}],
            text + piece,
        )
    lp = logprobs_object(tokens, values, tops, first) if logprobs else None
    return {"text": text, "index": index, "logprobs": lp, "finish_reason": "length"}


def tokenizer_info(tok, model_name: str, max_len: int) -> dict[str, Any]:
    ids = {"eos_token": tok.eos_id, "bos_token": tok.bos_id, "pad_token": tok.pad_id}
    names = {k: None if i is None else tok.decode([i], skip_special=False) for k, i in ids.items()}
    template = tok.chat_template if "{%" in (tok.chat_template or "") else None  # a Jinja template only
    return {**names, "chat_template": template, "model": model_name, "vocab_size": tok.vocab_size,
            "max_model_len": max_len}  # fmt: skip


async def scored_answer(service, req) -> dict[str, Any]:
    """`echo` (+ `logprobs`): each prompt token's chain-rule log-probability (exact for AR models;
    for diffusion models that of the left-to-right one-token decoder, see evaluation/chain), and
    with max_tokens 1 the likeliest next token. What lm-eval's `local-completions` asks for."""
    for name, bad in (("max_tokens", (req.max_tokens or 0) > 1), ("n", req.n != 1),
                      ("stream", req.stream), ("suffix", req.suffix is not None),
                      ("max_completion_tokens", req.max_completion_tokens is not None)):  # fmt: skip
        if bad:
            raise APIError(f"echo scores the prompt: {name} must be unset (max_tokens 0 or 1)", param=name)
    decode_settings(req.model_copy(update={"max_tokens": None}), service.default_preset)  # the extra fields
    p = req.prompt  # one text, texts, one token-id prompt, or several
    texts = [p] if isinstance(p, str) or isinstance(p[0], int) else p
    prompts = service.prompts(req)
    service.check_prompt_tokens(prompts)
    t0 = time.perf_counter()
    rows = await asyncio.to_thread(service.engine.score, prompts, k=max(req.logprobs or 0, 1),
                                   next_token=req.max_tokens == 1)  # fmt: skip
    tok, choices, done = service.engine.tok, [], []
    for p, (ids, row) in enumerate(zip(prompts, rows, strict=True)):
        choices.append(echo_choice(tok, texts[p], ids, row, p, req.logprobs is not None))
        done.append({"prompt_tokens": len(ids), "nfe": row.nfe,
                     "choices": [{"tokens": int(row.next is not None)}]})  # fmt: skip
    service.metrics.latency.observe(time.perf_counter() - t0)
    service.metrics.requests.labels("200").inc()
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    return service.answer("text_completion", rid, created, choices, done)
