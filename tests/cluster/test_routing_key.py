"""The ingress's choice of routing key: header, then a completion body's session_id, then a session path."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

from adapt_runtime.serving.cluster.ingress import routing_key  # noqa: E402


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "expected"),
    [
        ("POST", "/v1/completions", [(b"x-session-id", b"hdr")], b'{"session_id": "body"}', "hdr"),
        ("POST", "/v1/completions", [(b"X-Session-ID", b"hdr")], b"{}", "hdr"),
        ("POST", "/v1/chat/completions", [], b'{"messages": [], "session_id": "body"}', "body"),
        ("POST", "/v1/completions", [], b'{"prompt": "no session"}', None),
        ("POST", "/v1/completions", [], b'{"session_id": 5}', None),
        ("POST", "/v1/completions", [], b"not json session_id", None),
        ("POST", "/tokenize", [], b'{"session_id": "ignored"}', None),
        ("GET", "/v1/sessions/abc", [], b"", "abc"),
        ("PUT", "/v1/sessions/abc/state", [], b"session_id", "abc"),
        ("GET", "/v1/sessions", [], b"", None),
        ("POST", "/v1/completions", [], b'{"session_id": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ],
    ids=["header-wins", "header-any-case", "body-chat", "none", "non-string", "bad-json", "other-route",
         "session-path", "state-path", "list", "nested-past-the-recursion-limit"],
)
def test_routing_key(method, path, headers, body, expected):
    assert routing_key(method, path, headers, body) == expected
