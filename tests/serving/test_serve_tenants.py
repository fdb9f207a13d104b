"""Tenants and input checks against a real server: a per-key session quota, non-ASCII API keys sent as UTF-8,
refused writes shown to clients, session ids matched in full, lone surrogates refused with 400."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_testing import KEY_A, KEY_B, Server, assert_envelope

UNICODE_KEY = "clé-ünïcødé-密钥-0123456789"
MAX_SESSIONS = 12
QUOTA = 3  # the default with several keys: a quarter of --max-sessions
OVERFLOWING_LR = 1e30  # every fast-weight write overflows and is refused (the state stays unchanged)


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--max-sessions", str(MAX_SESSIONS), "--rule-config", json.dumps({"lr": OVERFLOWING_LR}),
                  keys=(KEY_A, KEY_B, UNICODE_KEY))


def _utf8_client(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60,
                        headers={"Authorization": b"Bearer " + key.encode("utf-8")})


def test_a_non_ascii_key_matches_a_utf8_client(server: Server) -> None:
    with _utf8_client(server, UNICODE_KEY) as http:
        assert http.get("/v1/models").status_code == 200
        created = http.post("/v1/sessions")
        assert created.status_code == 201
        assert http.get(f"/v1/sessions/{created.json()['id']}").status_code == 200
        http.delete(f"/v1/sessions/{created.json()['id']}")
    with _utf8_client(server, UNICODE_KEY[:-1]) as http:
        assert_envelope(http.get("/v1/models"), 401, "invalid_api_key")


def test_one_key_cannot_take_every_session(server: Server) -> None:
    with server.http(KEY_A) as a, server.http(KEY_B) as b:
        made = [a.post("/v1/sessions") for _ in range(QUOTA)]
        assert [r.status_code for r in made] == [201] * QUOTA
        refused = a.post("/v1/sessions")
        assert_envelope(refused, 429, "session_quota_reached")
        assert int(refused.headers["retry-after"]) > 0
        auto = a.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                      headers={"X-Session-ID": "one-more"})
        assert_envelope(auto, 429, "session_quota_reached")
        other = b.post("/v1/sessions")
        assert other.status_code == 201, "another key must still get sessions"
        for client, response in [*((a, r) for r in made), (b, other)]:
            client.delete(f"/v1/sessions/{response.json()['id']}")
        assert a.post("/v1/sessions").status_code == 201, "deleting frees the key's quota"


def test_refused_writes_are_shown(server: Server) -> None:
    sid = server.new_session()
    with server.http() as http:
        out = http.post("/v1/completions", headers={"X-Session-ID": sid},
                        json={"prompt": "Once upon a time there was a cat. " * 8, "max_tokens": 4})
        info = http.get(f"/v1/sessions/{sid}").json()
        http.delete(f"/v1/sessions/{sid}")
    adaptation = out.json()["adaptation"]
    assert adaptation["writes"] == 0 and adaptation["refused_writes"] > 0
    assert (info["writes"], info["refused_writes"]) == (0, adaptation["refused_writes"])


@pytest.mark.parametrize("where", ["field", "field-streamed", "path"])
def test_a_session_id_with_a_trailing_newline_is_400(server: Server, where: str) -> None:
    body = {"prompt": "Hi", "max_tokens": 1, "session_id": "abc\n"}
    with server.http() as http:
        if where.startswith("field"):
            response = http.post("/v1/completions", json={**body, "stream": where == "field-streamed"})
        else:
            response = http.get("/v1/sessions/abc%0A")
        assert_envelope(response, 400, "invalid_session_id")
        assert all(s["id"].strip() == s["id"] for s in http.get("/v1/sessions").json()["data"])


LONE = "tell me \ud800 a story"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": LONE, "max_tokens": 1}),
    ("/v1/completions", {"prompt": ["fine", LONE], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "stop": [LONE]}),
    ("/tokenize", {"prompt": LONE}),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}),
], ids=["prompt", "prompt-list", "chat", "chat-parts", "stop", "tokenize", "tokenize-chat"])
def test_a_lone_surrogate_is_400(server: Server, path: str, body: dict) -> None:
    with server.http() as http:
        content = json.dumps(body).encode()  # ASCII JSON: the lone surrogate travels as "\ud800"
        assert b"\\ud800" in content
        response = http.post(path, content=content, headers={"content-type": "application/json"})
        error = assert_envelope(response, 400, "invalid_request")
        assert "surrogate" in error["message"]
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
