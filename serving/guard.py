"""The ASGI guard in front of every route: API keys (deny by default) and the request-body limit.

It is one middleware, not a per-route dependency, so a route added later cannot forget it: only the paths in
``PUBLIC_PATHS`` answer without a key. Keys are compared as SHA-256 digests with ``hmac.compare_digest`` over
all configured keys (no early exit). The caller's principal is a hash of its key, stored in
``scope["state"]["principal"]``; the key itself is never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from adapt_runtime.serving.errors import envelope_bytes

PUBLIC_PATHS = frozenset({"/health"})
ANONYMOUS = "anonymous"

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


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
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _reject(send: Send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = envelope_bytes(status, message, code)
    extra = headers or []
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + extra})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: authentication, then the body-size limit (413), then the app."""

    def __init__(self, app: Any, keys: ApiKeys, body_limit: Callable[[str], int]) -> None:
        self.app = app
        self.keys = keys
        self.body_limit = body_limit

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
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > limit:
                await _reject(send, 413, f"request body exceeds {limit} bytes", "request_too_large")
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
