"""A Ray Serve cluster of adapt-serve on this machine for the tests: ``ray.init(num_cpus=2)``, an ingress and
engine replicas on the bundled model, a redis-server and a shared state directory."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import httpx
from adapt_runtime.serving.cluster.cli_ray import build_application
from adapt_runtime.serving.cluster.config import ClusterConfig, open_states
from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.launch import free_port
from redis_testing import RedisServer

APP = "adapt"


class Cluster:
    """Deploys the application on an initialised Ray; ``client`` talks to Serve's HTTP proxy."""

    def __init__(self, port: int, folder: Path, redis_server: RedisServer, replicas: int = 2,
                 lease_ttl_ms: int = 3000, **server: Any) -> None:
        from ray import serve

        self.redis = redis_server
        self.port = port
        self.config = ClusterConfig(
            ServerConfig(model="llama", threads=1, **server), redis_server.url, str(folder / "store"),
            replicas=replicas, replica_cpus=0.5, lease_ttl_ms=lease_ttl_ms, keep_versions=0, history=0,
            health_check_period_s=1.0)
        serve.run(build_application(self.config), name=APP, route_prefix="/")
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self.states = open_states(self.config, "tests")

    def turn(self, sid: str | None, prompt: str = "Once upon a time", max_tokens: int = 4, via: str = "header",
             **extra: Any) -> httpx.Response:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        headers = {}
        if sid is not None and via == "header":
            headers["X-Session-ID"] = sid
        elif sid is not None:
            body["session_id"] = sid
        return self.client.post("/v1/completions", json=body, headers=headers)

    def set_replicas(self, n: int) -> None:
        from ray import serve

        self.config = dataclasses.replace(self.config, replicas=n)
        serve.run(build_application(self.config), name=APP, route_prefix="/")

    def replica_actors(self) -> dict[str, Any]:
        """Replica unique id -> actor handle of every running engine replica."""
        import ray

        actors = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if "SessionEngine" in name and name.startswith("SERVE_REPLICA"):
                actors[name.rsplit("#", 1)[-1]] = ray.get_actor(name, namespace=entry["namespace"])
        return actors

    def kill(self, replica_id: str) -> None:
        import ray

        ray.kill(self.replica_actors()[replica_id], no_restart=True)

    def wait_replicas(self, n: int, timeout: float = 90) -> set[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = set(self.replica_actors())
            if len(ids) == n and self._healthy():
                return ids
            time.sleep(0.5)
        raise TimeoutError(f"{n} engine replicas were not up in {timeout} s")

    def _healthy(self) -> bool:
        from ray import serve

        status = serve.status().applications.get(APP)
        return status is not None and str(status.status).endswith("RUNNING")

    def close(self) -> None:
        from ray import serve

        self.client.close()
        serve.delete(APP)


def start_ray() -> int:
    """Ray and Serve's HTTP proxy (one per run: its port cannot change once started); returns the port."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="adapt-tests",
             configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
