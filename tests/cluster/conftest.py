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
