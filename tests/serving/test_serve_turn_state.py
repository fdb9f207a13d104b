"""A turn works on its session's own state (in-process app): no clone, one slot per active session, nothing of S
or the KV cache copied by a committed turn but the first write of each layer, and every way a turn ends without
committing (an error mid-decode, a client that leaves, ``"adapt": false``, a refused commit) puts the state back
bit for bit."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.context import ServerContext
from adapt_runtime.serving.edge.app import build_app
from adapt_runtime.serving.server import create_context
from adapt_runtime.serving.sessions import turn as turn_module
from serve_testing import TEST_DEVICE

import adapt_runtime
from adapt_runtime.checkpoint import Checkpoint
from adapt_runtime.state import FastWeights

CHUNK = 8


def _context(**options: Any) -> ServerContext:
    return create_context(ServerConfig(rule="hebbian", rule_config={"chunk_size": CHUNK}, device=TEST_DEVICE,
                                       **options))


def _close(ctx: ServerContext) -> None:
    ctx.engine.close()
    shutil.rmtree(ctx.store.files.root, ignore_errors=True)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Any, ServerContext]]:
    ctx = _context()
    try:
        yield build_app(ctx), ctx
    finally:
        _close(ctx)


@pytest.fixture
def checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[Checkpoint]:
    """Every checkpoint a turn takes, and a failure if any turn clones a state."""
    taken: list[Checkpoint] = []

    class Spy(Checkpoint):
        def __init__(self, state: FastWeights) -> None:
            super().__init__(state)
            taken.append(self)

    def no_clone(self: FastWeights) -> FastWeights:
        raise AssertionError("a turn cloned its session's state")

    monkeypatch.setattr(turn_module, "Checkpoint", Spy)
    monkeypatch.setattr(FastWeights, "clone", no_clone)
    return taken


def _run(app: Any, requests: list[tuple[str, dict]], together: bool = False) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            calls = [http.post(path, json=body) for path, body in requests]
            if together:
                return list(await asyncio.gather(*calls))
            return [await call for call in calls]

    return asyncio.run(go())


def _session(app: Any, ctx: ServerContext) -> tuple[str, Any]:
    (made,) = _run(app, [("/v1/sessions", {})])
    sid = made.json()["id"]
    return sid, next(s for s in ctx.store._sessions.values() if s.id == sid)


def _turn(sid: str, prompt: list[int], max_tokens: int, **extra: Any) -> tuple[str, dict]:
    return "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "session_id": sid, "temperature": 0.0,
                               **extra}


def _extend(state: FastWeights, new: list[int]) -> list[int]:
    """A prompt that extends what the state's KV cache holds (only ``new`` is read)."""
    return list(state.tokens[len(state.tokens) - state.kv_len :]) + new


def _snapshot(s: FastWeights) -> dict[str, Any]:
    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().clone()

    return {"S": {k: c(t) for k, t in s.S.items()}, "extra": {n: {k: c(t) for k, t in p.items()}
                                                              for n, p in s.extra.items()},
            "kv": [(c(k), c(v)) for k, v in s.kv or []],
            "pending": (s.pending.chunk, list(s.pending.positions), {n: c(t) for n, t in s.pending.tensors().items()}),
            "tokens": (list(s.tokens), s.tokens_offset), "last_logits": c(s.last_logits),
            "counters": (s.writes, s.refused_writes, s.kv_tokens, s.tokens_seen)}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _storages(s: FastWeights) -> dict[str, int]:
    ptrs = {f"S.{k}": t.untyped_storage().data_ptr() for k, t in s.S.items() if t is not None}
    for i, (k, v) in enumerate(s.kv or []):
        ptrs[f"K.{i}"], ptrs[f"V.{i}"] = k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()
    return ptrs


def _s_bytes(s: FastWeights) -> int:
    return sum(t.numel() * t.element_size() for t in s.S.values() if t is not None)


def _committed(app: Any, ctx: ServerContext) -> tuple[str, Any]:
    """A session with a committed turn that wrote (S non-zero, KV and a pending chunk held)."""
    sid, session = _session(app, ctx)
    (first,) = _run(app, [_turn(sid, list(range(5, 5 + 3 * CHUNK + 3)), 4)])
    assert first.status_code == 200, first.text
    assert session.state.writes > 0 and session.state.kv_len > 0
    return sid, session


# ------------------------------------------------------------------ a committed turn copies nothing
def test_a_committed_turn_without_a_write_copies_no_state(served, checkpoints) -> None:
    app, ctx = served
    sid, session = _committed(app, ctx)
    state, writes = session.state, session.state.writes
    ptrs = _storages(state)
    room = CHUNK - state.tokens_seen % CHUNK
    (second,) = _run(app, [_turn(sid, _extend(state, [7]), room - 2)])  # ends inside the pending chunk
    assert second.status_code == 200, second.text
    assert second.json()["adaptation"]["committed"]
    assert session.state is state, "the turn replaced the session's state"
    assert state.writes == writes  # no write fired
    assert [c.copied_bytes for c in checkpoints] == [0, 0]  # the first turn's too
    assert _storages(state) == ptrs, "S or the KV cache moved: the turn copied it"
    assert state.checkpoint is None


def test_a_committed_writing_turn_copies_each_layer_once_and_no_kv(served, checkpoints) -> None:
    app, ctx = served
    sid, session = _committed(app, ctx)
    state, writes = session.state, session.state.writes
    kv = {k: p for k, p in _storages(state).items() if not k.startswith("S.")}
    (second,) = _run(app, [_turn(sid, _extend(state, [7]), 2 * CHUNK + 2)])  # decode steps through two writes
    assert second.status_code == 200, second.text
    assert state.writes - writes >= 2 and session.state is state
    assert checkpoints[-1].copied_bytes == _s_bytes(state), "not exactly one copy of each written layer's S"
    assert {k: p for k, p in _storages(state).items() if not k.startswith("S.")} == kv, "the KV cache was copied"


def test_an_active_session_holds_one_slot(served, monkeypatch) -> None:
    app, ctx = served
    pool = ctx.engine.rt.slot_pool
    seen: list[tuple[int, int]] = []  # (rows of the call, slots held) at every batched bind
    real = pool.bind

    def bind(states: list[FastWeights], layers: list[int]) -> Any:
        slots = real(states, layers)
        seen.append((len(states), pool.bound()))
        return slots

    monkeypatch.setattr(pool, "bind", bind)
    made = [_session(app, ctx) for _ in range(3)]
    prompts = [list(range(5 + i, 5 + i + 2 * CHUNK + 1)) for i in range(3)]
    first = _run(app, [_turn(sid, p, 3 * CHUNK) for (sid, _), p in zip(made, prompts)], together=True)
    assert all(r.status_code == 200 for r in first), [r.text for r in first]
    seen.clear()
    second = _run(app, [_turn(sid, _extend(s.state, [9]), 3 * CHUNK) for sid, s in made], together=True)
    assert all(r.status_code == 200 for r in second), [r.text for r in second]
    assert max(rows for rows, _ in seen) == 3, "the turns never decoded together: no slot was taken"
    assert max(held for _, held in seen) <= 3, f"{max(held for _, held in seen)} slots held by 3 active sessions"


# ------------------------------------------------------------------ every turn that does not commit rolls back
def test_an_error_mid_decode_puts_the_state_back(served, monkeypatch) -> None:
    app, ctx = served
    sid, session = _committed(app, ctx)
    before = _snapshot(session.state)
    rt = ctx.engine.rt
    real, calls, written = rt.forward, [], []

    def failing(input_ids: Any, state: Any, adapt: bool = True, logits: str = "all") -> torch.Tensor:
        if torch.as_tensor(input_ids).shape[-1] == 1:
            calls.append(1)
            if len(calls) == CHUNK + 3:  # after a decode-time write
                written.append(state.writes - before["counters"][0])
                raise RuntimeError("injected")
        return real(input_ids, state, adapt=adapt, logits=logits)

    monkeypatch.setattr(rt, "forward", failing)
    (response,) = _run(app, [_turn(sid, _extend(session.state, [7]), 3 * CHUNK)])
    assert response.status_code == 500, response.text
    assert written and written[0] > 0, "no write happened before the error: the test would not see one kept"
    assert _equal(_snapshot(session.state), before)
    assert session.state.checkpoint is None and not session.busy


def test_adapt_false_puts_the_state_back(served) -> None:
    app, ctx = served
    sid, session = _committed(app, ctx)
    before = _snapshot(session.state)
    (response,) = _run(app, [_turn(sid, _extend(session.state, [7, 8, 9]), 2 * CHUNK, adapt=False)])
    assert response.status_code == 200, response.text
    assert response.json()["adaptation"]["committed"] is False
    assert _equal(_snapshot(session.state), before)


def test_a_client_that_leaves_mid_stream_puts_the_state_back(served) -> None:
    app, ctx = served
    sid, session = _committed(app, ctx)
    before = _snapshot(session.state)
    path, body = _turn(sid, _extend(session.state, [7]), 6 * CHUNK, stream=True)
    payload = json.dumps(body).encode()

    async def go() -> int:
        streamed, gone = asyncio.Event(), asyncio.Event()
        frames: list[bytes] = []
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                frames.append(message["body"])
                if len(frames) >= 3:  # a few tokens in: the client leaves
                    streamed.set()
                    gone.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"host", b"test"),
                             (b"content-length", str(len(payload)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        await app(scope, receive, send)
        assert streamed.is_set(), "the stream ended before the client left"
        for _ in range(3000):  # the rollback ends the turn once the model thread let go (the session busy till then)
            if not session.busy:
                break
            await asyncio.sleep(0.01)
        return len(frames)

    assert asyncio.run(go()) < 6 * CHUNK, "the whole answer was streamed: the client never left mid-stream"
    assert _equal(_snapshot(session.state), before)
    assert session.state.checkpoint is None and not session.busy


def test_a_refused_commit_puts_the_state_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _context(session_dir=tmp_path)
    try:
        app = build_app(ctx)
        sid, session = _committed(app, ctx)
        before = _snapshot(session.state)

        def disk_full(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(adapt_runtime.atomic.os, "fsync", disk_full)
            (response,) = _run(app, [_turn(sid, _extend(session.state, [7]), 2 * CHUNK)])
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "session_write_failed"
        assert _equal(_snapshot(session.state), before)
        (retry,) = _run(app, [_turn(sid, _extend(session.state, [7]), 2 * CHUNK)])  # and the retry commits
        assert retry.status_code == 200 and retry.json()["adaptation"]["committed"], retry.text
    finally:
        _close(ctx)
