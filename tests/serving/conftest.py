"""Fixtures for the serving tests: each module starts its servers once through ``launch``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from serve_testing import KEY_A, KEY_B, TEST_DEVICE, Server


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``launch(*flags)`` starts a server for this module; all are stopped when the module ends."""
    if (TEST_DEVICE or "").startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"ADAPT_TEST_DEVICE={TEST_DEVICE} but CUDA is not available")
    servers: list[Server] = []
    folder = tmp_path_factory.mktemp("serve")

    def start(*flags: str, keys: tuple[str, ...] = (KEY_A, KEY_B)) -> Server:
        server = Server(list(flags), folder / f"server{len(servers)}.log", keys)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
