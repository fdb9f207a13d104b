"""ServerContext: what every route reaches through ``request.app.state.ctx``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from adapt_runtime.serving.chat_template import ChatTemplate
from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.engine import Engine
from adapt_runtime.serving.errors import APIError, retry_later
from adapt_runtime.serving.metrics import Metrics
from adapt_runtime.serving.sessions import SessionStore
from fastapi import Request


@dataclass
class ServerContext:
    config: ServerConfig
    engine: Engine
    store: SessionStore
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
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", "model")

    def admit(self) -> None:
        """Count an inference request in; 429 with Retry-After past ``--max-concurrent-requests``."""
        if self.inflight >= self.config.max_concurrent_requests:
            raise retry_later(429, "the server is at its limit of concurrent requests; retry shortly",
                              "server_overloaded", 1)
        self.inflight += 1
        self.metrics.running.set(self.inflight)

    def leave(self) -> None:
        self.inflight -= 1
        self.metrics.running.set(self.inflight)


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx


def principal_of(request: Request) -> str:
    return request.scope["state"]["principal"]


def system_fingerprint(ctx: ServerContext) -> str:
    from adapt_runtime import __version__

    return f"adapt-serve-{__version__}-{ctx.config.rule}"


def describe_runtime(rt: Any) -> dict[str, Any]:
    try:
        return rt.config.to_dict()
    except AttributeError:
        return {"rule": getattr(getattr(rt, "rule", None), "name", "unknown")}
