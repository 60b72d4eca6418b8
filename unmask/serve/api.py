"""The OpenAI-compatible request bodies, their checks, and the OpenAI error shape.

Diffusion settings ride along as extra fields of the body (`extra_body` in the official client):
`preset` and any `DecodeConfig` field (`steps`, `block_len`, `threshold`, `kernel`, `cache`, ...),
validated by the same config checks as the command line. `canvas: true` (with `stream: true`) adds
a chunk with no choices and a `canvas` field per decoding step, for clients that draw the process.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from unmask.config import ConfigError, DecodeConfig
from unmask.decoding.presets import preset_config

MAX_N = 16  # samples per request
MAX_STEPS = 1024  # decoding steps per request (a bound on the work one request can ask for)
DECODE_FIELDS = {f.name for f in dataclasses.fields(DecodeConfig)} - {"max_new_tokens", "preset"}


class APIError(Exception):
    """A bad request: becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.headers = message, param, status, kind, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


SEED_LIMIT = 1 << 63  # seeds are in [0, 2**63)


class _Common(BaseModel):
    # strict: `steps: 1.5` or `n: "2"` are errors, not coerced; no Infinity / NaN anywhere
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(
        default=None, ge=1, description="new tokens (default: the preset's max_new_tokens)"
    )
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")
    temperature: float | None = Field(default=None, ge=0, description="0: greedy proposals")
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N, description=f"samples per prompt, 1..{MAX_N}")
    seed: int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT, description="same seed and settings -> same text (default 0)"
    )
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    preset: str | None = Field(default=None, description="decoder preset (mdlm, bd3lm, llada, conv, ...)")
    canvas: bool = Field(default=False, description="with stream: also send the whole canvas per step")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts, or token ids (one prompt or a list of them)"
    )
    suffix: str | None = Field(
        default=None,
        description="fill-in-the-middle: the text after the completion (bidirectional models); the "
        "completion is max_tokens [MASK]s between prompt and suffix, filled in place",
    )
    max_tokens: int | None = Field(
        default=None, ge=0, description="new tokens (default: the preset's max_new_tokens; 0 with echo)"
    )
    echo: bool = Field(default=False, description="with max_tokens 0 or 1: score the prompt (see logprobs)")
    logprobs: int | None = Field(
        default=None, ge=0, le=5, description="with echo: each prompt token's log-probability and the top k"
    )


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    tokens: list[int]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string: text parts joined, null as empty."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]


DecodeFields = create_model(
    "DecodeFields",
    __config__=ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"),
    **{name: (typing.get_type_hints(DecodeConfig)[name] | None, None) for name in sorted(DECODE_FIELDS)},
)


def _decode_fields(extra: dict[str, Any]) -> dict[str, Any]:
    """The extra body fields, each checked against its DecodeConfig type (a 400 names the first bad
    one): `kernel: 33.0`, `score: "bogus"`, `steps: "many"` never reach the decoder."""
    try:
        checked = DecodeFields.model_validate(extra)
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first.get("loc") else None
        raise APIError(f"{name}: {first['msg']} (got {first.get('input')!r})"[:300], param=name) from None
    return {k: v for k, v in checked.model_dump().items() if k in extra}


_PARALLEL = "a diffusion LM commits many tokens per forward pass from its own distributions"
UNSUPPORTED = {  # OpenAI fields this server refuses (unless given their neutral value), and why
    "logit_bias": f"not implemented: {_PARALLEL}; ban tokens with the decoder instead (ban_stop)",
    "presence_penalty": f"not implemented: {_PARALLEL}, so there are no running counts to penalise",
    "frequency_penalty": f"not implemented: {_PARALLEL}, so there are no running counts to penalise",
    "best_of": "not implemented: ask for n samples and rank them yourself",
    "logprobs": "not implemented for chat; /v1/completions with echo scores a text",
    "top_logprobs": "not implemented for chat; /v1/completions with echo scores a text",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "structured output is not supported",
}
NEUTRAL = (None, 0, 0.0, False, {}, [], "none", "auto")  # a field sent at its default asks for nothing


def decode_settings(req: _Common, default_preset: str, max_new_tokens: int = 1 << 14) -> DecodeConfig:
    """The request's DecodeConfig: its preset, its extra decoder fields, then max_tokens / temperature
    / top_p. A ConfigError names the field."""
    extra = dict(req.model_extra or {})
    for name in sorted(set(extra) & set(UNSUPPORTED)):
        value = extra.pop(name)
        if not (
            any(value == v and type(value) is type(v) for v in NEUTRAL) or (name == "best_of" and value == 1)
        ):
            raise APIError(f"{name}: {UNSUPPORTED[name]}", param=name)
    unknown = sorted(set(extra) - DECODE_FIELDS)
    if unknown:
        raise APIError(
            f"unknown field(s) {unknown}; decoder fields: {', '.join(sorted(DECODE_FIELDS))}",
            param=unknown[0],
        )
    extra = _decode_fields(extra)
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    if (
        None not in (req.max_tokens, req.max_completion_tokens)
        and req.max_tokens != req.max_completion_tokens
    ):
        raise APIError("max_tokens and max_completion_tokens differ: give one", param="max_completion_tokens")
    if req.temperature is not None:
        if req.temperature == 0:
            extra["proposal"] = "greedy"
        else:
            extra["temperature"] = req.temperature
    if req.top_p is not None:
        extra["top_p"] = req.top_p
    if max_tokens == 0:
        raise APIError("max_tokens 0 needs echo: true (scoring the prompt)", param="max_tokens")
    if max_tokens is not None:
        if max_tokens > max_new_tokens:
            field = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
            raise APIError(
                f"{field} must be <= {max_new_tokens} on this server (--max-new-tokens), got {max_tokens}",
                param=field,
            )
        extra["max_new_tokens"] = max_tokens
    try:
        cfg = preset_config(req.preset or default_preset, **extra)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        flag = re.search(r"--(?:decode\.)?(\w+)", str(e))
        param = "preset" if "preset" in str(e) else (flag.group(1) if flag else None)
        raise APIError(str(e).replace("--decode.", "").replace("--", ""), param=param) from e
    if cfg.steps > MAX_STEPS:
        raise APIError(f"steps must be <= {MAX_STEPS} on this server, got {cfg.steps}", param="steps")
    if cfg.max_new_tokens > max_new_tokens:  # a preset's own default
        raise APIError(
            f"the preset's max_new_tokens {cfg.max_new_tokens} exceeds this server's --max-new-tokens "
            f"{max_new_tokens}: pass max_tokens",
            param="max_tokens",
        )
    return cfg


def stops(req: _Common) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    out = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if len(out) > 4:
        raise APIError("stop takes at most 4 strings", param="stop")
    return tuple(s for s in out if s)


def usage(done: list[dict]) -> dict[str, int]:
    """Token counts of what is returned (after stop ids and stop strings) and the NFE spent."""
    prompt = sum(d["prompt_tokens"] for d in done)
    completion = sum(c["tokens"] for d in done for c in d["choices"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "nfe": sum(d["nfe"] for d in done),
    }
