"""SessionEngine: one Ray Serve replica holding the base model, today's batching scheduler and today's app.

Each replica builds the single-process server's context with a ``ClusterSessionStore`` (Redis leases, shared
blobs) in place of the local store, and answers every forwarded request by running it through the unchanged app
(auth, validation, OpenAI routes, SSE, session routes), adding ``X-Replica-ID``. Requests reach it through the
``ConsistentHashRouter`` keyed on the session id with no fallback replicas, so a session's turns land where its
state is cached; correctness does not depend on that (see ``sessions.cluster_store``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import torch
from adapt_runtime.serving.cluster.asgi_call import Item, call_asgi, http_scope
from adapt_runtime.serving.cluster.config import ClusterConfig, open_states
from adapt_runtime.serving.edge.app import build_app
from adapt_runtime.serving.server import create_context
from adapt_runtime.serving.sessions.cluster_store import ClusterSessionStore
from adapt_runtime.serving.sessions.files import decode_state
from adapt_runtime.serving.types import JsonObject
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

if TYPE_CHECKING:
    from ray.serve import Deployment

    from adapt_runtime.runtime import Runtime

log = logging.getLogger("adapt_serve")
REPLICA_HEADER = b"x-replica-id"


class SessionEngine:
    def __init__(self, config: ClusterConfig) -> None:
        if config.server.threads is None:
            torch.set_num_threads(max(1, int(config.replica_cpus)))
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.states = open_states(config, self.replica_id)
        server = config.server

        def make_store(runtime: Runtime, on_event: Callable[[str], None]) -> ClusterSessionStore:
            return ClusterSessionStore(self.states, runtime.new_state, lambda data: decode_state(data, runtime),
                                       server.session_memory_budget, server.max_sessions, on_event,
                                       max_per_owner=server.session_quota)

        self.ctx = create_context(server, make_store=make_store)
        self.app = build_app(self.ctx)
        log.info("engine replica %s ready", self.replica_id)

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> AsyncIterator[Item]:
        """One HTTP request through the app: the response start, then body chunks."""
        scope = http_scope(method, path, query, headers)
        async for item in call_asgi(self.app, scope, body, [(REPLICA_HEADER, self.replica_id.encode())]):
            yield item

    def replica(self) -> str:
        return self.replica_id

    def check_health(self) -> None:
        if not self.ctx.engine.alive:
            raise RuntimeError("the model thread has stopped")

    def __del__(self) -> None:
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            ctx.engine.close()


def replica_version(config: ClusterConfig) -> str:
    from adapt_runtime import __version__

    return hashlib.sha256(f"{__version__}:{config.for_replica()!r}".encode()).hexdigest()[:16]


def engine_deployment(config: ClusterConfig) -> Deployment:
    """The SessionEngine deployment with strict consistent-hash routing on the session id."""
    scaling: JsonObject = {"num_replicas": config.replicas}
    if config.max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": config.replicas, "max_replicas": config.max_replicas,
                                          "target_ongoing_requests": 2}}
    router = RequestRouterConfig(request_router_class=ConsistentHashRouter,
                                 request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 0})
    return serve.deployment(SessionEngine).options(
        name="SessionEngine",
        # a version that depends on what the replicas are built from: then ``serve.run`` with another replica count
        # scales the running replicas instead of replacing them all (Serve's Python API otherwise draws a random
        # version per run); ``version`` is only accepted from Serve's own internal callers in 2.60
        version=replica_version(config),
        _internal=True,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": config.replica_cpus},
        health_check_period_s=config.health_check_period_s,
        graceful_shutdown_timeout_s=20,
        request_router_config=router,
        **scaling,
    )
