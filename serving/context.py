"""ServerContext: what every route reaches through ``request.app.state.ctx``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.edge.chat_template import ChatTemplate
from adapt_runtime.serving.failures import InvalidRequest, LimitReached, NotFound
from adapt_runtime.serving.metrics import Metrics
from adapt_runtime.serving.types import JsonObject

if TYPE_CHECKING:
    from adapt_runtime.serving.engine.interface import EngineProtocol
    from adapt_runtime.serving.sessions.store import SessionStoreProtocol

    from adapt_runtime.runtime import Runtime

T = TypeVar("T")
OFF_LOOP_CHARS = 8192  # tokenizer work on more text than this runs on a worker thread


@dataclass
class ServerContext:
    config: ServerConfig
    engine: EngineProtocol
    store: SessionStoreProtocol
    metrics: Metrics
    template: ChatTemplate
    started_at: float = field(default_factory=time.time)
    inflight: int = 0

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def check_model(self, requested: str | None) -> None:
        """Requests may omit ``model`` or name the served model; anything else is 404, as in vLLM."""
        if requested and requested != self.model_name:
            raise NotFound(f"the model {requested!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", "model")

    def admit(self) -> None:
        """Count an inference request in; 429 with Retry-After past ``--max-concurrent-requests``."""
        if self.inflight >= self.config.max_concurrent_requests:
            raise LimitReached("the server is at its limit of concurrent requests; retry shortly",
                               "server_overloaded")
        self.inflight += 1
        self.metrics.running.set(self.inflight)

    def leave(self) -> None:
        self.inflight -= 1
        self.metrics.running.set(self.inflight)

    def check_work(self, choices: int, tokens: int | None = None) -> None:
        """400 past ``--max-choices-per-request`` (prompts x n) or ``--max-tokens-per-request`` (prompt tokens
        plus choices x max_tokens)."""
        if choices > self.config.max_choices_per_request:
            raise InvalidRequest(f"the request asks for {choices} choices (prompts x n); this server allows at most "
                                 f"{self.config.max_choices_per_request}", "too_many_choices", "n")
        if tokens is not None and tokens > self.config.max_tokens_per_request:
            raise InvalidRequest(f"the request would cost {tokens} tokens (prompt tokens + choices x max_tokens); "
                                 f"this server allows at most {self.config.max_tokens_per_request}",
                                 "too_many_tokens", "max_tokens")


async def off_loop(chars: int, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` (tokenizer work on ``chars`` characters): inline when small, else on a worker thread, so a
    large prompt does not stall the event loop (and every other client) while it is tokenised."""
    if chars <= OFF_LOOP_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def text_size(value: object) -> int:
    """Characters of text (or token ids) in a prompt or a list of messages."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_size(v) for v in value)
    text = getattr(value, "text", None)  # a content part
    if isinstance(text, str):
        return len(text)
    content = getattr(value, "content", None)  # a chat message
    return 1 if content is None else text_size(content)


def system_fingerprint(ctx: ServerContext) -> str:
    from adapt_runtime import __version__

    return f"adapt-serve-{__version__}-{ctx.config.rule}"


def describe_runtime(rt: Runtime) -> JsonObject:
    try:
        return rt.config.to_dict()
    except AttributeError:
        return {"rule": getattr(getattr(rt, "rule", None), "name", "unknown")}
