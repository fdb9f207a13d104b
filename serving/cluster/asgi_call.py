"""Run one HTTP request through an ASGI app in-process and hand its response back as items a Ray stream carries.

The first item is ``{"status": int, "headers": [[name, value], ...]}``; the rest are body chunks (``bytes``) as
the app sends them, so an SSE stream stays a stream across the ingress -> engine hop. When the caller stops
iterating (the client went away, or Serve cancelled the call), the app sees ``http.disconnect`` and its task is
cancelled, which is the same rollback path as a disconnect on the single-process server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from adapt_runtime.serving.edge.errors import envelope_bytes
from adapt_runtime.serving.types import ASGIApp, Message, Scope

log = logging.getLogger("adapt_serve")
Item = Message | bytes


def http_scope(method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method.upper(), "scheme": "http", "path": path, "raw_path": path.encode("utf-8"),
        "query_string": query, "root_path": "", "headers": [(bytes(k).lower(), bytes(v)) for k, v in headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
    }


async def call_asgi(app: ASGIApp, scope: Scope, body: bytes,
                    extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> AsyncIterator[Item]:
    """Yield the response of ``app`` to ``scope`` + ``body``: the start item, then body chunks."""
    outbox: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await outbox.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: outbox.put_nowait(None))
    started = finished = False
    try:
        while True:
            message = await outbox.get()
            if message is None:
                if not started:
                    error = task.exception() if not task.cancelled() else None
                    log.error("the app ended without a response: %r", error)
                    data = envelope_bytes(500, "internal error: no response", "internal_error")
                    yield {"status": 500, "headers": [[b"content-type", b"application/json"], *extra_headers]}
                    yield data
                return
            if message["type"] == "http.response.start":
                started = True
                headers = [[bytes(k), bytes(v)] for k, v in message.get("headers", [])]
                yield {"status": int(message["status"]), "headers": headers + [list(h) for h in extra_headers]}
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield bytes(chunk)
                if not message.get("more_body", False):
                    finished = True
                    return
    finally:
        if finished:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        gone.set()
        if not task.done():
            await asyncio.sleep(0)  # let the app see the disconnect first
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
