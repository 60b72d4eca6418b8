"""The server's edges, checked before any endpoint runs: the Host header, the API key, and every
request body's size, encoding and JSON shape.

- Host: a server bound to loopback answers only requests addressed to a loopback name (a page on
  another site cannot reach it through DNS rebinding); `--allowed-hosts` adds names.
- API key: compared in constant time (`hmac.compare_digest`); with a key, `/v1/*`, `/metrics` (unless
  `--open-metrics`) and the API docs (`/docs`, `/redoc`, `/openapi.json`) need it.
- Bodies of POSTs: at most `--max-body-bytes` (413), UTF-8 (400 naming the byte), a JSON object
  nested at most MAX_DEPTH deep without lone surrogates (`"\\ud800"`: 400 naming the field), read as
  JSON whatever the Content-Type (plain `curl -d` sends form-encoded).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi.responses import JSONResponse

MAX_DEPTH = 32
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
TOKENIZER_PATHS = ("/tokenizer_info", "/tokenize", "/detokenize")


class BadBody(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def host_name(header: str) -> str:
    """`Host:` without its port (`[::1]:8000` -> `::1`)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _depth(value: Any, limit: int, depth: int = 1) -> bool:
    """Whether a parsed JSON value nests deeper than `limit` (the recursion stops at `limit`; what the
    parser itself could not nest raised RecursionError before)."""
    if depth > limit:
        return True
    if isinstance(value, dict):
        return any(_depth(v, limit, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(_depth(v, limit, depth + 1) for v in value)
    return False


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The path of the first string holding a lone surrogate (not encodable as UTF-8), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and _lone_surrogate(k) is not None:
            return where or "body"
        found = _lone_surrogate(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def check_body(raw: bytes, max_bytes: int) -> dict:
    """A request body as a JSON object, or a BadBody naming what is wrong."""
    if len(raw) > max_bytes:
        raise BadBody(f"the body is {len(raw)} bytes, over --max-body-bytes {max_bytes}", status=413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadBody(
            f"the body is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadBody(f"the body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels") from None
    if _depth(body, MAX_DEPTH):
        raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels")
    if not isinstance(body, dict):
        raise BadBody(f"the body must be a JSON object, got {type(body).__name__}")
    where = _lone_surrogate(body)
    if where is not None:
        raise BadBody(
            f"{where}: a lone UTF-16 surrogate (\\ud800-\\udfff) is not text", param=where.split(".")[0]
        )
    return body


class Edges:
    """Pure ASGI middleware: Host, key and body checks; `on_refused(status)` counts refusals."""

    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        max_body_bytes: int,
        allowed_hosts: tuple[str, ...] | None,
        open_metrics: bool,
        on_refused=None,
    ):
        self.app, self.key, self.max_body_bytes = app, (api_key or "").encode(), max_body_bytes
        self.allowed_hosts, self.open_metrics, self.on_refused = allowed_hosts, open_metrics, on_refused

    def _protected(self, path: str) -> bool:
        api = path.startswith("/v1/") or path in DOC_PATHS or path in TOKENIZER_PATHS
        return api or (path == "/metrics" and not self.open_metrics)

    async def _refuse(self, scope, receive, send, status: int, message: str, kind: str, param=None) -> None:
        if self.on_refused is not None:
            self.on_refused(status)
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                return await self._refuse(scope, receive, send, 400,
                                          f"Host {host!r} is not served here (--allowed-hosts)",
                                          "invalid_request_error", "host")  # fmt: skip
        if self.key and self._protected(scope["path"]):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                return await self._refuse(scope, receive, send, 401,
                                          "missing or wrong API key (Authorization: Bearer KEY)",
                                          "authentication_error")  # fmt: skip
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            too_big = f"the body is {int(declared)} bytes, over --max-body-bytes {self.max_body_bytes}"
            return await self._refuse(scope, receive, send, 413, too_big, "invalid_request_error")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._refuse(scope, receive, send, 413,
                                          f"the body is over {self.max_body_bytes} bytes (--max-body-bytes)",
                                          "invalid_request_error")  # fmt: skip
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            check_body(raw, self.max_body_bytes)
        except BadBody as e:
            return await self._refuse(
                scope, receive, send, e.status, e.message, "invalid_request_error", e.param
            )
        scope = dict(scope)  # read as JSON whatever Content-Type said
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope["headers"].append((b"content-type", b"application/json"))
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # the client's disconnect, when it goes away
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        return await self.app(scope, replay, send)
