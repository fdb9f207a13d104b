"""One code path for streamed and whole responses: engine events -> choice chunks -> SSE frames or a fold.

``Generation.choices`` yields the choice part of each chunk in vLLM's order (per choice: an opening chunk for
chat, the echoed prompt for completions, token chunks, one finish chunk). The first chunk is awaited before any
header is sent, so errors while reading the prompt still get their HTTP status; later errors become an SSE
error event. The turn is committed when the engine reports ``Done`` and released before the last frame goes
out, so a client that reads ``[DONE]`` can start its next turn at once.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Protocol

from adapt_runtime.serving.context import ServerContext, system_fingerprint
from adapt_runtime.serving.edge.errors import APIError, http_error
from adapt_runtime.serving.edge.requests import SESSION_HEADER
from adapt_runtime.serving.edge.schemas import StreamOptions
from adapt_runtime.serving.edge.sse import DONE, ClosingStream, frame, race_disconnect
from adapt_runtime.serving.engine.events import Done, Failed, Finished, PromptScored, Token
from adapt_runtime.serving.engine.scheduler import Job
from adapt_runtime.serving.failures import ServingError
from adapt_runtime.serving.sessions.turn import Turn
from adapt_runtime.serving.types import JsonObject
from fastapi import Request
from starlette.responses import JSONResponse, Response

import adapt_runtime as ar

if TYPE_CHECKING:
    from adapt_runtime.state import FastWeights

log = logging.getLogger("adapt_serve")


class Formatter(Protocol):
    chunk_object: str
    final_object: str

    def opening(self, index: int) -> dict | None: ...
    def echo(self, index: int, scored: PromptScored) -> dict | None: ...
    def token(self, event: Token) -> dict | None: ...
    def finish(self, index: int, reason: str) -> dict: ...
    def fold(self, index: int, parts: list[dict]) -> dict: ...


class Generation:
    def __init__(self, ctx: ServerContext, turn: Turn, job: Job, fmt: Formatter, endpoint: str) -> None:
        self.ctx, self.turn, self.job, self.fmt, self.endpoint = ctx, turn, job, fmt, endpoint
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.final_state: FastWeights | None = None
        self.started = time.perf_counter()
        self._last_token: float | None = None

    def header(self, kind: str) -> JsonObject:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.ctx.model_name,
                "system_fingerprint": system_fingerprint(self.ctx)}

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def choices(self) -> AsyncGenerator[dict, None]:
        n = self.job.n
        events = self.ctx.engine.run(self.job)
        try:
            async for event in events:
                if isinstance(event, PromptScored):
                    self.prompt_tokens += event.prompt_tokens
                    self.ctx.metrics.prompt_tokens.inc(event.prompt_tokens)
                    for index in range(event.prompt_index * n, (event.prompt_index + 1) * n):
                        for part in (self.fmt.opening(index), self.fmt.echo(index, event)):
                            if part is not None:
                                yield part
                elif isinstance(event, Token):
                    self._count_token()
                    part = self.fmt.token(event)
                    if part is not None:
                        yield part
                elif isinstance(event, Finished):
                    self.ctx.metrics.finished.labels(finished_reason=event.reason).inc()
                    yield self.fmt.finish(event.index, event.reason)
                elif isinstance(event, Done):
                    self.final_state = self.job.states[0] if self.job.states else self.turn.state
                    await self.turn.finish(self.final_state)
                elif isinstance(event, Failed):
                    raise as_api_error(event.error)
        finally:
            await events.aclose()  # now, not when collected: closing the run cancels the job if it still runs

    def _count_token(self) -> None:
        now = time.perf_counter()
        self.completion_tokens += 1
        self.ctx.metrics.generation_tokens.inc()
        if self._last_token is None:
            self.ctx.metrics.ttft.observe(now - self.started)
        else:
            self.ctx.metrics.itl.observe(now - self._last_token)
        self._last_token = now

    def extras(self) -> JsonObject:
        if self.turn.session_id is None:
            return {}
        return {"session_id": self.turn.session_id, "adaptation": self.turn.adaptation(self.final_state)}


def as_api_error(error: BaseException) -> APIError:
    if isinstance(error, ServingError):
        return http_error(error)
    if isinstance(error, ar.ContextOverflowError):
        return APIError(400, str(error), "context_length_exceeded", "prompt")
    log.error("generation failed: %r", error)
    return APIError(500, f"generation failed: {type(error).__name__}", "internal_error")


async def respond(gen: Generation, request: Request, stream: bool, options: StreamOptions | None) -> Response:
    """Await the first chunk, then stream the rest or fold it into one body; cleans up the turn either way. A
    client that leaves before the end cancels its job, so the model thread stops reading and decoding for it."""
    ctx = gen.ctx
    parts = gen.choices()
    handed_off = False
    try:
        opened = await race_disconnect(_first(parts), request)
        if opened is None:
            ctx.metrics.disconnects.inc()
            return Response(status_code=499)
        first = opened[0]
        headers = {SESSION_HEADER: gen.turn.session_id} if gen.turn.session_id is not None else {}
        if stream:
            handed_off = True
            body = _sse(gen, parts, first, options or StreamOptions())
            return ClosingStream(body, media_type="text/event-stream", headers=headers)
        folded = await race_disconnect(_fold(gen, parts, first), request)
        if folded is None:
            ctx.metrics.disconnects.inc()
            return Response(status_code=499)
        ctx.metrics.requests.labels(endpoint=gen.endpoint, outcome="ok").inc()
        return JSONResponse(folded, headers=headers)
    except ServingError as err:
        ctx.metrics.errors.labels(code=err.code).inc()
        raise
    finally:
        if not handed_off:
            await parts.aclose()
            await gen.turn.close()
            ctx.leave()
            ctx.metrics.e2e.observe(time.perf_counter() - gen.started)


async def _first(parts: AsyncGenerator[dict, None]) -> tuple[dict | None]:
    """The first chunk (None if there is none), in a tuple so that None is not mistaken for a disconnect."""
    try:
        return (await parts.__anext__(),)
    except StopAsyncIteration:
        return (None,)


async def _fold(gen: Generation, parts: AsyncGenerator[dict, None], first: dict | None) -> JsonObject:
    by_index: dict[int, list[dict]] = {}
    if first is not None:
        by_index.setdefault(first["index"], []).append(first)
    async for part in parts:
        by_index.setdefault(part["index"], []).append(part)
    choices = [gen.fmt.fold(i, by_index[i]) for i in sorted(by_index)]
    return {**gen.header(gen.fmt.final_object), "choices": choices, "usage": gen.usage(), **gen.extras()}


async def _sse(gen: Generation, parts: AsyncGenerator[dict, None], first: dict | None,
               options: StreamOptions) -> AsyncIterator[bytes]:
    ctx = gen.ctx
    include = options.include_usage or options.continuous_usage_stats
    outcome = "disconnected"
    try:
        head = json.dumps(gen.header(gen.fmt.chunk_object), ensure_ascii=False)[:-1]
        if first is not None:
            chunk = {**gen.header(gen.fmt.chunk_object), "choices": [first]}
            if gen.turn.session_id is not None:
                chunk["session_id"] = gen.turn.session_id
            if include:
                chunk["usage"] = gen.usage() if options.continuous_usage_stats else None
            yield frame(chunk)
        async for part in parts:
            # the chunk header is fixed for the whole stream: serialise it once, splice each choice in
            body = json.dumps(part, ensure_ascii=False)
            usage = json.dumps(gen.usage()) if options.continuous_usage_stats else "null"
            end = f', "usage": {usage}}}' if include else "}"
            yield f'data: {head}, "choices": [{body}]{end}\n\n'.encode()
        if options.include_usage:
            yield frame({**gen.header(gen.fmt.chunk_object), "choices": [], "usage": gen.usage(), **gen.extras()})
        outcome = "ok"
    except ServingError as err:
        outcome = "error"
        ctx.metrics.errors.labels(code=err.code).inc()
        yield frame(http_error(err).body())
    except Exception as exc:  # noqa: BLE001 - headers are out; the client gets an SSE error event
        outcome = "error"
        log.exception("stream failed")
        yield frame(as_api_error(exc).body())
    finally:
        if outcome == "disconnected":
            ctx.metrics.disconnects.inc()
        ctx.metrics.requests.labels(endpoint=gen.endpoint, outcome=outcome).inc()
        await parts.aclose()
        await gen.turn.close()
        ctx.leave()
        ctx.metrics.e2e.observe(time.perf_counter() - gen.started)
    yield DONE
