"""Server-sent events at the HTTP edge: the one framer, the end marker, the disconnect race, the closing stream.

Every streamed route (completions, chat, long reads) frames its events here, so they share one encoding (UTF-8
JSON, ``ensure_ascii=False``, as vLLM sends) and one way of noticing that the client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import TypeVar

from adapt_runtime.serving.types import JsonObject, Receive, Scope, Send
from fastapi import Request
from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def frame(payload: JsonObject) -> bytes:
    """One ``data:`` event of a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def race_disconnect(work: Awaitable[T], request: Request) -> T | None:
    """Run ``work``; if the client goes away first, cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClosingStream(StreamingResponse):
    """A stream whose body is closed when the response ends for any reason (a send that timed out included), so
    the turn and the concurrency slot come back at once instead of when the generator is collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
