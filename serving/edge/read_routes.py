"""``POST /v1/sessions/{id}/read``: read a document of any length into a session's fast weights.

The document is read as ``rt.read`` reads it (``adapt_runtime.read``): windows no longer than the context, the
KV dropped before each, S learning throughout. Each window is one job of the model thread (a prompt read with
its scores and no answer), so other sessions keep decoding between windows and the event loop never waits on
the model. The read is a turn: it holds the session (409 while another turn runs), works on its state in place
(``serving.turn``), commits when the last window is read, and rolls back on an error or a client that goes
away. ``"stream": true`` sends one ``session.read.progress`` event per window, then the result, then ``[DONE]``.

The same reading serves long prompts in a session (``"long_prompt": true`` on completions and chat): the part
that does not fit is read first, and the answer is generated from the last window (``split_long_prompt``).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from adapt_runtime.serving.context import ServerContext, off_loop
from adapt_runtime.serving.edge.errors import APIError, http_error
from adapt_runtime.serving.edge.requests import SESSION_HEADER, ctx_of, principal_of, session_id_of
from adapt_runtime.serving.edge.responses import as_api_error
from adapt_runtime.serving.edge.schemas import ChatCompletionRequest, CompletionRequest, ReadRequest
from adapt_runtime.serving.edge.sse import DONE, frame, race_disconnect
from adapt_runtime.serving.engine.events import Failed, PromptScored
from adapt_runtime.serving.engine.sampling import SamplingParams
from adapt_runtime.serving.engine.scheduler import Job, Prompt
from adapt_runtime.serving.failures import ServingError
from adapt_runtime.serving.sessions.turn import Turn, start_turn
from adapt_runtime.serving.types import JsonObject
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapt_runtime.read import DEFAULT_MAX_WINDOW, ReadResult, mean_or_nan, window_spans

router = APIRouter()
_SCORE_ONLY = SamplingParams(max_tokens=0, logprobs=0)


def read_window(ctx: ServerContext, requested: int | None) -> int:
    limit = min(ctx.engine.max_len, DEFAULT_MAX_WINDOW)
    if requested is None:
        return limit
    if requested > ctx.engine.max_len:
        raise APIError(400, f"window {requested} is longer than the context of {ctx.engine.max_len} tokens",
                       "invalid_window", "window")
    return requested


def check_read_length(ctx: ServerContext, count: int, param: str) -> None:
    if count == 0:
        raise APIError(400, "the document is empty after tokenization", "empty_document", param)
    limit = ctx.config.max_read_tokens
    if count > limit:
        raise APIError(400, f"the document has {count} tokens; this server reads at most {limit} per request "
                       "(--max-read-tokens); send it in parts", "read_too_long", param)


class DocumentRead:
    """One read of ``ids`` into ``turn.state``: ``windows()`` yields a progress dict per window."""

    def __init__(self, ctx: ServerContext, turn: Turn, ids: list[int], window: int) -> None:
        self.ctx, self.turn, self.ids, self.window = ctx, turn, ids, window
        self.spans = window_spans(turn.state.tokens_seen, len(ids), window, ctx.engine.rt.config.chunk_size)
        self.writes0, self.refused0 = turn.state.writes, turn.state.refused_writes
        self.nll: list[float] = []
        self.started = time.perf_counter()

    async def windows(self) -> AsyncIterator[JsonObject]:
        state = self.turn.state
        for k, (a, b) in enumerate(self.spans):
            piece = self.ids[a:b]
            state.drop_kv()
            job = Job([Prompt(state, piece, piece, echo=True)], 1, _SCORE_ONLY, True, frozenset(),
                      emit=lambda _: None)
            scores = None
            async with contextlib.aclosing(self.ctx.engine.run(job)) as events:  # closed: the job let go of state
                async for event in events:
                    if isinstance(event, PromptScored):
                        scores = event.logprobs
                    elif isinstance(event, Failed):
                        raise as_api_error(event.error)
            self.ctx.metrics.prompt_tokens.inc(len(piece))
            self.nll.append(mean_or_nan([-s[0] for s in (scores or [])[1:] if s is not None]))
            yield {"object": "session.read.progress", "window": k + 1, "windows": len(self.spans),
                   "tokens_read": b, "tokens": len(self.ids), "nll": _num(self.nll[-1]),
                   "writes": state.writes - self.writes0}

    def result(self) -> ReadResult:
        state = self.turn.state
        return ReadResult(len(self.ids), len(self.spans), state.writes - self.writes0,
                          state.refused_writes - self.refused0, time.perf_counter() - self.started,
                          tuple(self.nll))

    def body(self) -> JsonObject:
        result = self.result()
        return {"id": f"read-{uuid.uuid4().hex}", "object": "session.read", "session_id": self.turn.session_id,
                "model": self.ctx.model_name, **result.to_dict(), "mean_nll": _num(result.mean_nll),
                "committed": self.turn.committed, "tokens_seen": self.turn.state.tokens_seen}

    async def run(self) -> JsonObject:
        """Read every window and commit; the whole response body."""
        async for _ in self.windows():
            pass
        await self.turn.finish(self.turn.state)
        return self.body()


def _num(x: float) -> float | None:
    return None if x != x else round(x, 6)


async def _finish(ctx: ServerContext, turn: Turn, outcome: str) -> None:
    await turn.close()
    ctx.leave()
    ctx.metrics.requests.labels(endpoint="read", outcome=outcome).inc()


@router.post("/v1/sessions/{session_id}/read")
async def read_document(request: Request, session_id: str, body: ReadRequest) -> Response:
    ctx = ctx_of(request)
    if (body.text is None) == (body.tokens is None):
        raise APIError(400, "send exactly one of text or tokens", "invalid_request", "text")
    if body.tokens is not None:
        ids = ctx.engine.check_ids(list(body.tokens), "tokens")
    else:
        text = body.text or ""
        ids = await off_loop(len(text), lambda: ctx.engine.encode(text, add_special_tokens=body.add_special_tokens))
    check_read_length(ctx, len(ids), "tokens" if body.tokens is not None else "text")
    window = read_window(ctx, body.window)
    turn, _ = await start_turn(ctx, principal_of(request), session_id_of(request, session_id), True,
                               lambda _: None)
    reading = DocumentRead(ctx, turn, ids, window)
    headers = {SESSION_HEADER: turn.session_id or session_id}
    if body.stream:
        return StreamingResponse(_sse(ctx, reading), media_type="text/event-stream", headers=headers)
    outcome = "error"
    try:
        folded = await race_disconnect(reading.run(), request)
        if folded is None:
            outcome = "disconnected"
            ctx.metrics.disconnects.inc()
            return Response(status_code=499)
        outcome = "ok"
        return JSONResponse(folded, headers=headers)
    finally:
        await _finish(ctx, turn, outcome)


async def _sse(ctx: ServerContext, reading: DocumentRead) -> AsyncIterator[bytes]:
    outcome = "disconnected"
    try:
        async for progress in reading.windows():
            yield frame(progress)
        await reading.turn.finish(reading.turn.state)
        yield frame(reading.body())
        outcome = "ok"
    except ServingError as err:
        outcome = "error"
        yield frame(http_error(err).body())
    finally:
        await _finish(ctx, reading.turn, outcome)
    yield DONE


# ---------------------------------------------------------------------------------------------- long prompts
@dataclass(frozen=True)
class LongPrompt:
    """A session prompt longer than the context: ``overflow`` is read into memory, ``tail`` is the prompt."""

    overflow: list[int]
    tail: list[int]
    max_tokens: int

    def prepare(self, turn: Turn) -> None:
        """Before planning the tail: no KV, so the tail is read whole after the overflow."""
        turn.state.drop_kv()

    async def read(self, ctx: ServerContext, turn: Turn, request: Request) -> bool:
        """Read the overflow into the turn's state (on the model thread), raced against the client leaving as
        generation is: False when it left (the read is cancelled at once). On failure or a client gone, the turn
        is given back (rolled back) and the admission left."""
        try:
            done = await race_disconnect(self._read(ctx, turn), request)
        except BaseException:
            await turn.close()
            ctx.leave()
            raise
        if done is None:
            ctx.metrics.disconnects.inc()
            await turn.close()
            ctx.leave()
            return False
        return True

    async def _read(self, ctx: ServerContext, turn: Turn) -> bool:
        reading = DocumentRead(ctx, turn, self.overflow, read_window(ctx, None))
        async for _ in reading.windows():
            pass
        turn.state.drop_kv()
        return True


def split_long_prompt(ctx: ServerContext, request: Request, body: CompletionRequest | ChatCompletionRequest,
                      ids: list[int],
                      requested: int | None) -> LongPrompt | None:
    """The split of an opted-in (``long_prompt``) session prompt that does not fit the context, else None (the
    request goes the usual way, where an over-long prompt is a 400). ``requested`` is the asked ``max_tokens``
    (None: half the context for the prompt's last window, the rest for the answer)."""
    max_len = ctx.engine.max_len
    fits = len(ids) + (requested or 0) <= max_len
    if not getattr(body, "long_prompt", False) or fits or session_id_of(request, body.session_id) is None:
        return None
    if body.n > 1 or getattr(body, "echo", False) or not body.adapt:
        raise APIError(400, "long_prompt reads into the session's memory: it takes n = 1, adapt on and no echo",
                       "invalid_session_request", "long_prompt")
    if requested is not None and requested >= max_len:
        raise APIError(400, f"max_tokens {requested} leaves no room in the context of {max_len} tokens",
                       "context_length_exceeded", "max_tokens")
    keep = max_len // 2 if requested is None else max_len - requested
    overflow, tail = ids[: len(ids) - keep], ids[len(ids) - keep :]
    check_read_length(ctx, len(overflow), "prompt")
    return LongPrompt(overflow, tail, max_len - keep)
