"""Fixtures for the cluster tests: a real redis-server per module; everything skips without the ``ray`` extra."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("redis", reason="the cluster tests need the ray extra: pip install -e '.[ray]'")

from redis_testing import RedisServer  # noqa: E402


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
