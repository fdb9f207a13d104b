"""Cluster test fixtures: a real redis-server per module (each test module skips without the ``ray`` extra)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_testing import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[int]:
    """One local Ray and Serve proxy for the whole run (starting them costs ~15 s on 2 cores); the port of the
    proxy. Serve applications are per module."""
    pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
    from cluster_testing import start_ray, stop_ray

    yield start_ray()
    stop_ray()
