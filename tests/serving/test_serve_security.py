"""Auth fails closed on every route but /health, limits answer 413/400/429, and every error is the envelope."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import threading
from typing import Any

import httpx
import pytest
from adapt_runtime.serving.edge import guard
from adapt_runtime.serving.edge.app import router as main_router
from adapt_runtime.serving.edge.guard import PUBLIC_PATHS, ApiKeys, Guard
from adapt_runtime.serving.edge.session_routes import router as session_router
from serve_testing import KEY_A, KEY_B, MODEL, Server, assert_envelope

MAX_BODY = 4096
MAX_SESSIONS = 3
PUBLIC = frozenset({"/health"})  # the only paths that answer without a key: listed here, not read from the guard


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--rule", "hebbian", "--max-request-bytes", str(MAX_BODY), "--max-sessions", str(MAX_SESSIONS),
                  "--max-sessions-per-key", str(MAX_SESSIONS),
                  "--max-concurrent-requests", "2")


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "sess_" + "A" * 22, path)


def _routes(server: Server) -> list[tuple[str, str]]:
    """(method, path) of every route the app documents or the main routers declare (a route left out of the
    schema included), plus the framework's own and an unknown path."""
    found = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no/such/route"), ("POST", "/v1/embeddings")}
    for route in [*main_router.routes, *session_router.routes]:
        found |= {(method, _concrete(route.path)) for method in route.methods}
    with server.http() as http:
        documented = http.get("/openapi.json").json()["paths"]
    found |= {(method.upper(), _concrete(path)) for path, ops in documented.items() for method in ops}
    return sorted(found)


def test_only_the_listed_paths_are_public() -> None:
    assert PUBLIC_PATHS == PUBLIC


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY_A}", f"Bearer {KEY_A.upper()}",
                                           "Bearer"], ids=["none", "wrong", "basic", "case", "empty"])
def test_every_route_but_health_needs_a_valid_key(server: Server, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for method, path in _routes(server):
            response = http.request(method, path, headers=headers, json={})
            if path in PUBLIC:
                assert response.status_code == 200, path
            else:
                error = assert_envelope(response, 401, "invalid_api_key")
                assert error["type"] == "authentication_error", (method, path)


def test_the_walk_covers_the_api(server: Server) -> None:
    walked = {path for _, path in _routes(server)}
    expected = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/sessions", "/tokenize", "/detokenize",
                "/metrics", "/health", "/v1/sessions/" + "sess_" + "A" * 22 + "/state"}
    assert expected <= walked


def test_each_key_works(server: Server) -> None:
    for key in server.keys:
        assert server.client(key).models.list().data[0].id == MODEL


BAD_REQUESTS = [
    ("POST", "/v1/completions", {"max_tokens": 2}, 400, "invalid_request"),
    ("POST", "/v1/completions", {"prompt": "Hi", "temperature": 7}, 400, "invalid_request"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "invalid_request"),
    ("POST", "/v1/completions", {"prompt": "Hi", "n": 0}, 400, "invalid_request"),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 100000}, 400, "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": [1, 99999]}, 400, "invalid_token_id"),
    ("POST", "/v1/completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model_not_found"),
    ("POST", "/v1/completions", {"prompt": "Hi", "suffix": "x"}, 400, "unsupported_parameter"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "invalid_request"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request"),
    ("POST", "/detokenize", {"tokens": [99999]}, 400, "invalid_token_id"),
    ("POST", "/tokenize", {}, 400, "invalid_request"),
    ("POST", "/v1/sessions", {"unknown": 1}, 400, "invalid_request"),
    ("DELETE", "/v1/models", None, 405, "method_not_allowed"),
    ("GET", "/v1/nothing-here", None, 404, "not_found"),
]


@pytest.mark.parametrize("method,path,body,status,code", BAD_REQUESTS,
                         ids=[f"{m}-{p.strip('/').replace('/', '.')}-{c}-{i}" for i, (m, p, _, _, c)
                              in enumerate(BAD_REQUESTS)])
def test_errors_come_in_the_openai_envelope(server: Server, method: str, path: str, body: dict | None,
                                            status: int, code: str) -> None:
    with server.http() as http:
        assert_envelope(http.request(method, path, json=body), status, code)


def test_malformed_json_is_400(server: Server) -> None:
    with server.http() as http:
        response = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_envelope(response, 400)


def test_oversized_bodies_are_413(server: Server) -> None:
    with server.http() as http:
        declared = http.post("/v1/completions", json={"prompt": "x" * (2 * MAX_BODY)})

        def chunks():
            yield b'{"prompt": "'
            for _ in range(4):
                yield b"y" * MAX_BODY
            yield b'"}'

        streamed = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_envelope(declared, 413, "request_too_large")
    assert_envelope(streamed, 413, "request_too_large")


def test_session_limit_is_429_with_retry_after(server: Server) -> None:
    with server.http() as http:
        for _ in range(MAX_SESSIONS + 1):
            response = http.post("/v1/sessions")
            if response.status_code != 201:
                break
        assert_envelope(response, 429, "session_limit_reached")
        assert int(response.headers["retry-after"]) > 0
        for session in http.get("/v1/sessions").json()["data"]:
            http.delete(f"/v1/sessions/{session['id']}")


def test_too_many_concurrent_requests_is_429(server: Server) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 300, "stream": True, "ignore_eos": True}
    started = threading.Barrier(3)
    streams = []

    def hold() -> None:
        with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            started.wait()
            streams.append(sum(1 for _ in lines))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait()
    with server.http() as http:
        response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    for thread in threads:
        thread.join()
    assert_envelope(response, 429, "server_overloaded")
    assert int(response.headers["retry-after"]) > 0
    assert len(streams) == 2


def _guarded_request(authorization: str) -> httpx.Response:
    """One request, in-process, through the ``Guard`` in front of an app that answers 200 with the principal."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        body = scope["state"]["principal"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    guarded = Guard(app, ApiKeys((KEY_A, KEY_B)), lambda _: MAX_BODY)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/v1/completions", json={}, headers={"Authorization": authorization})

    return asyncio.run(go())


def test_api_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """No response can show whether keys are compared with ``==`` (which leaks timing) or with
    ``hmac.compare_digest``: the comparison itself is watched. Every configured key is compared (no early exit),
    as SHA-256 digests, and the answer follows what ``compare_digest`` says."""
    configured = (KEY_A, KEY_B)
    digest = {key: hashlib.sha256(key.encode()).digest() for key in (*configured, "wrong-key")}
    calls: list[tuple[bytes, bytes]] = []
    verdict: dict[str, Any] = {"override": None}
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b) if verdict["override"] is None else verdict["override"]

    monkeypatch.setattr(guard.hmac, "compare_digest", recording)
    if hasattr(guard, "compare_digest"):  # also when the guard imports the function itself
        monkeypatch.setattr(guard, "compare_digest", recording)

    accepted = _guarded_request(f"Bearer {KEY_A}")
    assert accepted.status_code == 200 and accepted.text
    assert sorted(calls) == sorted((digest[KEY_A], digest[key]) for key in configured)

    calls.clear()
    assert _guarded_request("Bearer wrong-key").status_code == 401
    assert sorted(calls) == sorted((digest["wrong-key"], digest[key]) for key in configured)

    calls.clear()
    verdict["override"] = False  # compare_digest decides: a valid key it does not match is refused
    assert _guarded_request(f"Bearer {KEY_A}").status_code == 401
    assert len(calls) == len(configured)
