"""The ASGI guard in front of every route: API keys (deny by default) and the request-body limit.

It is one middleware, not a per-route dependency, so a route added later cannot forget it: only the paths in
``PUBLIC_PATHS`` answer without a key. Keys are compared as SHA-256 digests with ``hmac.compare_digest`` over
all configured keys (no early exit); a presented key is read as UTF-8, as clients send it. The caller's
principal is a hash of its key, stored in ``scope["state"]["principal"]``; the key itself is never stored or
logged. Slow clients are cut off: the body must arrive within ``read_timeout`` (408), and a response the client
leaves unread for ``send_timeout`` is dropped (one WARNING line), so its concurrency slot and session come back.
A JSON body nested deeper than ``MAX_JSON_DEPTH`` is refused (400 ``json_too_deep``) before any parser or model
walks it: Python's parser and validators recurse, and a body near the recursion limit would end as a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from adapt_runtime.serving.edge.errors import SlowClient, envelope_bytes, is_slow_client
from adapt_runtime.serving.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("adapt_serve")
PUBLIC_PATHS = frozenset({"/health"})
ANONYMOUS = "anonymous"
MAX_JSON_DEPTH = 64  # arrays and objects inside one another; a real request nests fewer than 10
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a string's brackets are text, not nesting
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}

T = TypeVar("T")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The configured keys, held only as digests."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._digests = [_digest(key) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def principal(self, presented: str | None) -> str | None:
        """The principal id for a presented key, ``None`` if it matches no key."""
        if not self._digests:
            return ANONYMOUS
        if presented is None:
            return None
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return hashlib.sha256(b"principal:" + candidate).hexdigest()[:24] if matched else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _bearer(scope: Scope) -> str | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    with contextlib.suppress(UnicodeDecodeError):
        value = value.encode("latin-1").decode("utf-8")  # header bytes are UTF-8 from every common client
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body``, read as JSON, nests arrays and objects more than ``limit`` deep (brackets in strings do
    not count). Linear in the body; a body with no more than ``limit`` opening brackets is not even scanned.
    Malformed JSON may count wrongly, which is harmless: the parser refuses it anyway."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for byte in _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", body)):
        depth += _DEPTH_STEP[byte]
        if depth > limit:
            return True
    return False


async def _within(work: Awaitable[T], seconds: float | None) -> T:
    """``await work``, raising TimeoutError after ``seconds`` (None: no limit); no extra task on 3.11+."""
    if seconds is None:
        return await work
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await work
    return await asyncio.wait_for(work, seconds)


async def _reject(send: Send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = envelope_bytes(status, message, code)
    extra = headers or []
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + extra})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: authentication, then the body-size limit (413), then the app."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, body_limit: Callable[[str], int], read_timeout: float | None = None,
                 send_timeout: float | None = None, json_body: Callable[[str], bool] = lambda _: True) -> None:
        """``body_limit(path)``: the largest body a path takes; ``json_body(path)``: whether its body is JSON (the
        nesting limit applies; a binary body, such as a state file, is not scanned)."""
        self.app = app
        self.keys = keys
        self.body_limit = body_limit
        self.json_body = json_body
        self.read_timeout = read_timeout
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        principal = ANONYMOUS if path in PUBLIC_PATHS else self.keys.principal(_bearer(scope))
        if principal is None:
            challenge = [(b"www-authenticate", b"Bearer")]
            await _reject(send, 401, "invalid or missing API key", "invalid_api_key", challenge)
            return
        scope.setdefault("state", {})["principal"] = principal
        limit = self.body_limit(path)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, 413, f"request body exceeds {limit} bytes", "request_too_large")
            return
        try:
            chunks = await _within(self._read_body(receive, send, limit), self.read_timeout)
        except (TimeoutError, asyncio.TimeoutError):
            await _reject(send, 408, f"the request body did not arrive within {self.read_timeout:g} s",
                          "request_timeout", [(b"connection", b"close")])
            return
        if chunks is None:
            return
        body = b"".join(chunks)
        if self.json_body(path) and json_too_deep(body):
            await _reject(send, 400, f"the JSON body nests arrays and objects more than {MAX_JSON_DEPTH} deep",
                          "json_too_deep")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def timed_send(message: Message) -> None:
            try:
                await _within(send(message), self.send_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                raise SlowClient(f"the client read nothing for {self.send_timeout:g} s") from None

        try:
            await self.app(scope, replay, send if self.send_timeout is None else timed_send)
        except Exception as exc:
            if not is_slow_client(exc):
                raise
            log.warning("dropped a response to %s: the client read nothing for %g s", path, self.send_timeout)

    @staticmethod
    async def _read_body(receive: Receive, send: Send, limit: int) -> list[bytes] | None:
        """The body's chunks; None when the request ended here (the client left, or 413 was sent)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > limit:
                await _reject(send, 413, f"request body exceeds {limit} bytes", "request_too_large")
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks
