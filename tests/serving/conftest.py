"""Fixtures for the serving tests: each module starts its servers once through ``launch``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from serve_testing import KEY_A, KEY_B, Server


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``launch(*flags)`` starts a server for this module; all are stopped when the module ends."""
    servers: list[Server] = []
    folder = tmp_path_factory.mktemp("serve")

    def start(*flags: str, keys: tuple[str, ...] = (KEY_A, KEY_B)) -> Server:
        server = Server(list(flags), folder / f"server{len(servers)}.log", keys)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
