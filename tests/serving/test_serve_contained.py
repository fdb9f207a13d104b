"""Bad input is contained (issue 17, items 5-7, 9, 10): a 400 in the envelope, never a 500, and a refused request
leaves nothing behind. The app runs in-process over ASGI (no socket) with a persistent session directory, so
what a request leaves on disk is visible; raw ASGI calls stand in for clients that leave or stop reading."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.context import ServerContext
from adapt_runtime.serving.edge.app import build_app
from adapt_runtime.serving.edge.guard import MAX_JSON_DEPTH
from adapt_runtime.serving.server import create_context
from serve_testing import TEST_DEVICE

SEND_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ServerContext]]:
    folder = tmp_path_factory.mktemp("sessions")
    config = ServerConfig(rule="hebbian", device=TEST_DEVICE, session_dir=folder, send_timeout=SEND_TIMEOUT)
    ctx = create_context(config)
    try:
        yield build_app(ctx), ctx
    finally:
        ctx.engine.close()
        shutil.rmtree(folder, ignore_errors=True)


def _calls(app: Any, requests: list[tuple[str, str, Any, dict | None]]) -> list[httpx.Response]:
    """Each (method, path, body, headers): a dict body goes as JSON, bytes or str as they are (a 500 comes back
    as a response, not as the app's exception)."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            out = []
            for method, path, body, headers in requests:
                if isinstance(body, (bytes, str)):
                    hdrs = {"content-type": "application/json", **(headers or {})}
                    out.append(await http.request(method, path, content=body, headers=hdrs))
                else:
                    out.append(await http.request(method, path, json=body, headers=headers))
            return out

    return asyncio.run(go())


def _envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    if code is not None:
        assert error["code"] == code, error
    return error


def _files(ctx: ServerContext, sid: str) -> list[Path]:
    return [p for p in ctx.store.files.root.rglob("*") if p.name.startswith(sid)]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# item 5: JSON nested deep in any field ------------------------------------------------------------------------
ROUTES = {
    "completions": ("/v1/completions", '{"prompt": "Hi", "max_tokens": 1, "extra": %s}'),
    "chat": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "extra": %s}'),
    "tokenize": ("/tokenize", '{"prompt": "Hi", "extra": %s}'),
    "read": ("/v1/sessions/deep-read/read", '{"text": "Hi", "extra": %s}'),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_json_nested_past_the_limit_is_400_on_every_route(served: tuple[Any, ServerContext], route: str) -> None:
    app, ctx = served
    path, template = ROUTES[route]
    depths = [MAX_JSON_DEPTH + 1, 960, 100_000]
    responses = _calls(app, [("POST", path, template % _nested(d - 1), None) for d in depths])
    for depth, response in zip(depths, responses):
        error = _envelope(response, 400, "json_too_deep")
        assert str(MAX_JSON_DEPTH) in error["message"], depth
    assert not _files(ctx, "deep-read") and "deep-read" not in [s.id for s in ctx.store.list("anonymous")]


def test_no_depth_near_the_recursion_limit_is_a_500(served: tuple[Any, ServerContext]) -> None:
    """The 500s came from a narrow band of depths (json.loads still parses, the code after it recurses past the
    limit); where the band lies depends on the stack, so every depth around it is tried."""
    app, _ = served
    responses = _calls(app, [("POST", "/tokenize", ROUTES["tokenize"][1] % _nested(d), None) for d in range(850, 1001)])
    assert [r.status_code for r in responses] == [400] * len(responses)


def test_json_as_deep_as_the_limit_is_served(served: tuple[Any, ServerContext]) -> None:
    app, _ = served
    path, template = ROUTES["tokenize"]
    brackets = '"[{\\"' * 50  # brackets inside strings are not nesting
    (deep, strings) = _calls(
        app,
        [
            ("POST", path, template % _nested(MAX_JSON_DEPTH - 1), None),
            ("POST", path, template % json.dumps(brackets), None),
        ],
    )
    assert deep.status_code == 200, deep.text
    assert strings.status_code == 200, strings.text


def test_a_state_header_nested_deep_is_400(served: tuple[Any, ServerContext]) -> None:
    app, ctx = served
    header = b'{"__metadata__": {"format": "x"}, "deep": ' + _nested(100_000).encode() + b"}"
    data = len(header).to_bytes(8, "little") + header
    (created,) = _calls(app, [("POST", "/v1/sessions", None, None)])
    sid = created.json()["id"]
    (response,) = _calls(
        app, [("PUT", f"/v1/sessions/{sid}/state", data, {"content-type": "application/octet-stream"})]
    )
    _envelope(response, 400, "invalid_state")


# item 6: /tokenize validates its messages like chat does ------------------------------------------------------
def test_tokenize_with_empty_messages_is_400(served: tuple[Any, ServerContext]) -> None:
    app, ctx = served
    empty, chat = _calls(
        app,
        [
            ("POST", "/tokenize", {"messages": []}, None),
            ("POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}, None),
        ],
    )
    error = _envelope(empty, 400)
    assert error["param"] == "messages", error
    assert chat.status_code == 200, chat.text
    assert chat.json()["count"] > 0


# item 7: a read's text is checked like a prompt -------------------------------------------------------------
def test_a_read_of_a_lone_surrogate_is_400_and_makes_no_session(served: tuple[Any, ServerContext]) -> None:
    app, ctx = served
    (response,) = _calls(app, [("POST", "/v1/sessions/lone-read/read", '{"text": "a\\ud800b"}', None)])
    error = _envelope(response, 400, "invalid_request")
    assert "text holds a lone surrogate" in error["message"], error
    (missing,) = _calls(app, [("GET", "/v1/sessions/lone-read", None, None)])
    _envelope(missing, 404, "session_not_found")


# item 9: a refused request creates no session ------------------------------------------------------------------
REFUSED = {
    "completion-n": ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "n": 2}),
    "completion-prompts": ("/v1/completions", {"prompt": ["Hi", "Ho"], "max_tokens": 1}),
    "chat-n": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "n": 2}),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_session_request_leaves_no_session(served: tuple[Any, ServerContext], case: str) -> None:
    app, ctx = served
    sid = f"made-by-failure-{case}"
    count = len(ctx.store)
    path, body = REFUSED[case]
    (response,) = _calls(app, [("POST", path, body, {"X-Session-ID": sid})])
    _envelope(response, 400, "invalid_session_request")
    (missing,) = _calls(app, [("GET", f"/v1/sessions/{sid}", None, None)])
    _envelope(missing, 404, "session_not_found")
    assert len(ctx.store) == count, "the refused request took a session of the quota"
    assert not _files(ctx, sid), "the refused request left files"


def test_adapt_false_on_an_unknown_id_runs_and_creates_nothing(served: tuple[Any, ServerContext]) -> None:
    app, ctx = served
    sid = "read-only-probe"
    count = len(ctx.store)
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 2,
        "echo": True,
        "logprobs": 0,
        "temperature": 0,
        "adapt": False,
    }
    probe, fresh = _calls(
        app,
        [
            ("POST", "/v1/completions", body, {"X-Session-ID": sid}),
            ("POST", "/v1/completions", {**body, "adapt": True}, None),
        ],
    )
    assert probe.status_code == 200, probe.text
    assert probe.headers["X-Session-ID"] == sid and probe.json()["session_id"] == sid
    assert probe.json()["adaptation"]["committed"] is False
    assert probe.json()["choices"][0]["logprobs"] == fresh.json()["choices"][0]["logprobs"], "not a fresh state"
    (missing,) = _calls(app, [("GET", f"/v1/sessions/{sid}", None, None)])
    _envelope(missing, 404, "session_not_found")
    assert len(ctx.store) == count and not _files(ctx, sid)


def test_a_valid_turn_on_an_unknown_id_still_creates_it(served: tuple[Any, ServerContext]) -> None:
    app, ctx = served
    sid = "made-on-use"
    (response,) = _calls(
        app, [("POST", "/v1/completions", {"prompt": "Hi there", "max_tokens": 1}, {"X-Session-ID": sid})]
    )
    assert response.status_code == 200, response.text
    assert response.json()["adaptation"]["committed"] is True
    (info,) = _calls(app, [("GET", f"/v1/sessions/{sid}", None, None)])
    assert info.status_code == 200 and info.json()["turns"] == 1, info.text
    assert _files(ctx, sid)


# item 10: a long-prompt read stops when its client leaves; a slow client is one WARNING line; HEAD /health ------
async def _asgi(
    app: Any,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    after_body: Callable[[], Awaitable[dict]],
    send: Callable[[dict], Awaitable[None]] | None = None,
) -> list[dict]:
    """One raw ASGI call: ``receive`` gives the body, then whatever ``after_body`` returns (a disconnect)."""
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await after_body()

    async def record(message: dict) -> None:
        sent.append(message)
        if send is not None:
            await send(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in {"content-type": "application/json", **headers}.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": raw,
        "scheme": "http",
        "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
    }
    await app(scope, receive, record)
    return sent


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_long_prompt_read_stops_when_its_client_leaves(
    served: tuple[Any, ServerContext], route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, ctx = served
    sid = f"long-gone-{route}"
    windows = 12
    ids = [(7 * i) % 500 + 3 for i in range(windows * ctx.engine.max_len)]
    if route == "completions":
        path, body = "/v1/completions", {"prompt": ids, "max_tokens": 1, "long_prompt": True}
    else:
        text = ctx.engine.detok.decode(ids)
        path, body = (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": text}], "max_tokens": 1, "long_prompt": True},
        )
    jobs = 0
    real = ctx.engine.run

    async def gone_after_the_first_window() -> dict:
        while jobs < 1:
            await asyncio.sleep(0.005)
        return {"type": "http.disconnect"}

    def counted(job: Any) -> Any:
        nonlocal jobs
        jobs += 1
        return real(job)

    monkeypatch.setattr(ctx.engine, "run", counted)
    sent = asyncio.run(
        _asgi(app, "POST", path, json.dumps(body).encode(), {"X-Session-ID": sid}, gone_after_the_first_window)
    )
    assert sent[0]["status"] == 499, sent
    assert jobs <= 2, f"the read went on for {jobs} windows after its client left"
    session = ctx.store.get("anonymous", sid)
    assert not session.busy and session.record.turns == 0 and ctx.inflight == 0


def test_a_dropped_slow_client_is_one_warning_line(
    served: tuple[Any, ServerContext], caplog: pytest.LogCaptureFixture
) -> None:
    app, ctx = served

    async def never_reads(message: dict) -> None:
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()

    async def stays() -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    body = json.dumps({"prompt": "Hi", "max_tokens": 4, "stream": True}).encode()
    caplog.set_level(logging.INFO, logger="adapt_serve")
    started = time.monotonic()
    asyncio.run(_asgi(app, "POST", "/v1/completions", body, {}, stays, never_reads))
    assert time.monotonic() - started < SEND_TIMEOUT + 30
    records = [r for r in caplog.records if r.name == "adapt_serve"]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in records]
    dropped = [r for r in records if "dropped a response" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].levelno == logging.WARNING
    assert ctx.inflight == 0


def test_head_health_is_200(served: tuple[Any, ServerContext]) -> None:
    app, _ = served
    head, get = _calls(app, [("HEAD", "/health", None, None), ("GET", "/health", None, None)])
    assert head.status_code == 200 and head.content == b""
    assert get.status_code == 200 and get.json() == {"status": "ok"}
