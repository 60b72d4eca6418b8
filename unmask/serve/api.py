"""The OpenAI-compatible request bodies, their checks, and the OpenAI error shape.

Diffusion settings ride along as extra fields of the body (`extra_body` in the official client):
`preset` and any `DecodeConfig` field (`steps`, `block_len`, `threshold`, `kernel`, `cache`, ...),
validated by the same config checks as the command line. `canvas: true` (with `stream: true`) adds
an `event: canvas` server-sent event per decoding step, for clients that draw the process.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # diffusion settings travel as extra fields

    model: str
    max_tokens: int | None = Field(
        default=None, description="new tokens (default: the preset's max_new_tokens)"
    )
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, description=f"samples per prompt, 1..{MAX_N}")
    seed: int | None = Field(default=None, description="same seed and settings -> same text (default 0)")
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None
    preset: str | None = Field(default=None, description="decoder preset (mdlm, bd3lm, llada, conv, ...)")
    canvas: bool = Field(default=False, description="with stream: also send the whole canvas per step")


class CompletionRequest(_Common):
    prompt: str | list[str]
    suffix: str | None = Field(
        default=None,
        description="fill-in-the-middle: the text after the completion (bidirectional models); the "
        "completion is max_tokens [MASK]s between prompt and suffix, filled in place",
    )


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]


def decode_settings(req: _Common, default_preset: str) -> DecodeConfig:
    """The request's DecodeConfig: its preset, its extra decoder fields, then max_tokens / temperature
    / top_p. A ConfigError names the field."""
    extra = dict(req.model_extra or {})
    unknown = sorted(set(extra) - DECODE_FIELDS)
    if unknown:
        raise APIError(
            f"unknown field(s) {unknown}; decoder fields: {', '.join(sorted(DECODE_FIELDS))}",
            param=unknown[0],
        )
    for name in ("max_tokens", "n"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise APIError(f"{name} must be >= 1, got {value}", param=name)
    if req.n > MAX_N:
        raise APIError(f"n must be <= {MAX_N}, got {req.n}", param="n")
    if req.temperature is not None:
        if req.temperature < 0:
            raise APIError(f"temperature must be >= 0, got {req.temperature}", param="temperature")
        if req.temperature == 0:
            extra["proposal"] = "greedy"
        else:
            extra["temperature"] = req.temperature
    if req.top_p is not None:
        extra["top_p"] = req.top_p
    if req.max_tokens is not None:
        extra["max_new_tokens"] = req.max_tokens
    try:
        cfg = preset_config(req.preset or default_preset, **extra)
    except (ConfigError, TypeError, ValueError) as e:
        flag = re.search(r"--(?:decode\.)?(\w+)", str(e))
        param = "preset" if "preset" in str(e) else (flag.group(1) if flag else None)
        raise APIError(str(e).replace("--decode.", "").replace("--", ""), param=param) from e
    if cfg.steps > MAX_STEPS:
        raise APIError(f"steps must be <= {MAX_STEPS} on this server, got {cfg.steps}", param="steps")
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
