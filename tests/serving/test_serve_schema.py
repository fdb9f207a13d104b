"""Schemathesis generates requests from the server's own OpenAPI schema; none may get a 5xx.

Bounded: a few examples per operation, against a server whose context is short so that generated
``max_tokens`` values stay cheap."""

from __future__ import annotations

import pytest
from serve_testing import KEY_A, Server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY_A}"}


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--rule", "hebbian", "--max-model-len", "96", "--max-sessions", "64")


def test_no_request_from_the_schema_gets_a_server_error(server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, "the schema should document every route"
    failures: list[str] = []
    statuses: list[int] = []

    for operation in operations:

        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        @given(case=operation.as_strategy())
        def probe(case) -> None:
            response = case.call(headers=AUTH, timeout=60)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        probe()
    assert not failures, "\n".join(failures)
    assert len(statuses) >= 2 * len(operations)
    assert {200, 400} <= set(statuses), "the generated requests should reach both valid and invalid paths"
