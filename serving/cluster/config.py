"""ClusterConfig: the settings of ``adapt-serve --ray`` (no Ray import, so the CLI can build it cheaply)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from adapt_runtime.serving.cluster.blobs import BlobStore
from adapt_runtime.serving.cluster.lease import LeaseConfig, LeaseStore
from adapt_runtime.serving.cluster.state_store import StateStore
from adapt_runtime.serving.config import ServerConfig


@dataclass(frozen=True)
class ClusterConfig:
    """Settings of the Ray Serve mode; ``server`` carries today's flags for every engine replica."""

    server: ServerConfig
    redis_url: str
    state_store: str
    replicas: int = 2
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    lease_ttl_ms: int = 10_000
    keep_versions: int = 2
    history: int = 1000
    max_ongoing_requests: int = 8
    max_queued_requests: int = 64
    health_check_period_s: float = 5.0
    prefix: str = "adapt"
    app_name: str = "adapt"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas: must be >= replicas ({self.replicas}), got {self.max_replicas}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis: expected a redis://host:port/db URL, got {self.redis_url!r}")
        if not self.state_store:
            raise ValueError("state_store: a directory or fsspec URL is required")
        LeaseConfig(self.lease_ttl_ms, self.prefix)

    def for_replica(self) -> ClusterConfig:
        """What an engine replica is built from: the scaling fields fixed, so that changing the replica count is
        not a new version of the replicas (Serve would replace them all, and every session would remap)."""
        return dataclasses.replace(self, replicas=1, max_replicas=None)


def open_states(config: ClusterConfig, holder: str) -> StateStore:
    """The lease and state stores of ``config`` for one holder (a replica id, or a tool)."""
    import redis

    client = redis.Redis.from_url(config.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
    leases = LeaseStore(client, holder, LeaseConfig(config.lease_ttl_ms, config.prefix))
    return StateStore(leases, BlobStore(config.state_store), config.keep_versions, config.history)
