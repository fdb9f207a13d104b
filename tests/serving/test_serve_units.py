"""In-process tests of the server's parts: detokenization with stop strings, keys, config and CLI parsing,
session files and the session store (budget, TTL, limits) with stand-in states."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from adapt_runtime.serving.cli import _bytes, _seconds, main
from adapt_runtime.serving.config import ServerConfig, parse_rule_config, read_api_key_file
from adapt_runtime.serving.edge.errors import http_error
from adapt_runtime.serving.edge.guard import ANONYMOUS, ApiKeys
from adapt_runtime.serving.engine.detokenize import Detokenizer, TextStream
from adapt_runtime.serving.failures import ServingError
from adapt_runtime.serving.sessions.files import SessionFiles, SessionRecord, atomic_write
from adapt_runtime.serving.sessions.local_store import SessionStore
from click.testing import CliRunner
from transformers import AutoTokenizer

import adapt_runtime as ar


@pytest.fixture(scope="module")
def detok() -> Detokenizer:
    return Detokenizer(AutoTokenizer.from_pretrained(ar.bundled_model_dir()))


def _stream_all(detok: Detokenizer, text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    prompt = detok.tokenizer.encode("Once upon a time")
    ids = detok.tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(detok, detok.anchor(prompt), stops)
    out = []
    for token in ids:
        delta, hit = stream.push(token)
        out.append(delta)
        if hit:
            return "".join(out), True
    return "".join(out) + stream.flush(), False


@pytest.mark.parametrize("text,stops,expected,hit", [
    (" there was a cat. The cat ran.", (), " there was a cat. The cat ran.", False),
    (" there was a cat. The cat ran.", (". The",), " there was a cat", True),
    (" there was a cat. The cat ran.", ("dog",), " there was a cat. The cat ran.", False),
    (" there was a cat. The cat ran.", ("zzz", "cat"), " there was a ", True),
    (" café and naïve", (), " café and naïve", False),
], ids=["no-stop", "stop-mid", "stop-absent", "first-of-two", "multibyte"])
def test_text_stream(detok: Detokenizer, text: str, stops: tuple[str, ...], expected: str, hit: bool) -> None:
    assert _stream_all(detok, text, stops) == (expected, hit)


def test_text_stream_holds_back_a_possible_stop(detok: Detokenizer) -> None:
    ids = detok.tokenizer.encode(" the cat sat", add_special_tokens=False)
    anchor = detok.anchor(detok.tokenizer.encode("Once upon a time"))
    stream = TextStream(detok, anchor, (" the dog",))
    emitted = "".join(stream.push(t)[0] for t in ids[:1])
    assert emitted == "", "' the' may start the stop string ' the dog' and must wait"
    rest = "".join(stream.push(t)[0] for t in ids[1:]) + stream.flush()
    assert emitted + rest == detok.continuation(ids, anchor) == " the cat sat"


def test_api_keys_compare_digests() -> None:
    keys = ApiKeys(("alpha", "bravo"))
    assert keys.principal("alpha") and keys.principal("bravo")
    assert keys.principal("alpha") != keys.principal("bravo")
    for wrong in (None, "", "alph", "alpha ", "ALPHA"):
        assert keys.principal(wrong) is None
    assert ApiKeys(()).principal(None) == ANONYMOUS


def test_config_validates_and_defaults_to_localhost(tmp_path) -> None:
    assert ServerConfig().host == "127.0.0.1"
    with pytest.raises(ValueError, match="rule"):
        ServerConfig(rule="telepathy")
    with pytest.raises(ValueError, match="max_sessions"):
        ServerConfig(max_sessions=0)
    assert parse_rule_config('{"lr": 0.5}') == {"lr": 0.5}
    for bad in ("[1]", "{lr: 1}"):
        with pytest.raises(ValueError, match="rule_config"):
            parse_rule_config(bad)
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha\n\n  bravo  \n")
    assert read_api_key_file(keys) == ("alpha", "bravo")


@pytest.mark.parametrize("text,value", [("4096", 4096), ("2M", 2 * 2**20), ("512KiB", 512 * 2**10),
                                        ("1g", 2**30)], ids=["plain", "M", "KiB", "g"])
def test_cli_sizes(text: str, value: int) -> None:
    assert _bytes(text) == value


@pytest.mark.parametrize("text,value", [("90", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800)],
                         ids=["plain", "m", "h", "d"])
def test_cli_durations(text: str, value: float) -> None:
    assert _seconds(text) == value


def test_cli_help_explains_every_flag_and_rejects_bad_input() -> None:
    runner = CliRunner()
    helped = runner.invoke(main, ["--help"])
    assert helped.exit_code == 0
    for flag in ("--model", "--rule", "--rule-config", "--host", "--port", "--api-key", "--api-key-file",
                 "--served-model-name", "--max-model-len", "--max-sessions", "--session-memory-budget",
                 "--session-dir", "--session-ttl", "--max-request-bytes", "--max-concurrent-requests",
                 "--chat-template", "--dtype", "--device"):
        assert flag in helped.output
    bad = runner.invoke(main, ["--rule-config", "[1, 2]"])
    assert bad.exit_code == 2 and "rule_config" in bad.output


def test_atomic_write_replaces_whole_files(tmp_path) -> None:
    target = tmp_path / "owner" / "file.bin"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_scan_skips_damaged_sidecars_and_removes_temp_files(tmp_path) -> None:
    files = SessionFiles(tmp_path)
    good = SessionRecord("sess_" + "a" * 22, "owner1", 1.0, 2.0, 3, {"k": "v"})
    files.write_record(good)
    folder = tmp_path / "owner1"
    (folder / ("sess_" + "b" * 22 + ".json")).write_text("{truncated")
    (folder / ("sess_" + "c" * 22 + ".json")).write_text(json.dumps({**good.__dict__, "owner": "someone"}))
    (folder / ".sess_x.safetensors.123.tmp").write_bytes(b"partial")
    assert files.scan() == [good]
    assert not list(folder.glob(".*.tmp"))


class FakeState:
    """Stands in for FastWeights in store tests: a byte size and the bytes it serialises to."""

    def __init__(self, nbytes: int = 100, tag: str = "") -> None:
        self.nbytes, self.tag = nbytes, tag

    def to_bytes(self) -> bytes:
        return json.dumps({"nbytes": self.nbytes, "tag": self.tag}).encode()

    @staticmethod
    def from_bytes(data: bytes) -> FakeState:
        return FakeState(**json.loads(data))


def _store(tmp_path, **overrides) -> SessionStore:
    options = dict(budget=250, max_sessions=10, ttl=3600.0, persistent=True)
    options.update(overrides)
    return SessionStore(FakeState, FakeState.from_bytes, SessionFiles(tmp_path), **options)


def test_store_spills_least_recently_used_and_reloads(tmp_path) -> None:
    async def scenario() -> None:
        store = _store(tmp_path)
        sessions = [await store.create("owner1", state=FakeState(100, f"s{i}")) for i in range(3)]
        assert store.resident_bytes() <= 250
        assert sessions[0].state is None, "the oldest session goes to disk"
        state = await store.acquire(sessions[0])
        assert state.tag == "s0"
        store.release(sessions[0])
        await asyncio.sleep(0.05)
        assert store.resident_bytes() <= 250

    asyncio.run(scenario())


def test_store_restores_after_restart_and_keeps_owners_apart(tmp_path) -> None:
    async def scenario() -> str:
        store = _store(tmp_path)
        session = await store.create("owner1", {"m": "1"}, state=FakeState(10, "kept"))
        await store.commit(session, FakeState(10, "committed"))
        return session.id

    sid = asyncio.run(scenario())

    async def after_restart() -> None:
        store = _store(tmp_path)
        assert store.restore() == 1
        with pytest.raises(ServingError) as foreign:
            store.get("owner2", sid)
        assert http_error(foreign.value).status == 404
        session = store.get("owner1", sid)
        assert session.record.turns == 1 and session.record.metadata == {"m": "1"}
        assert (await store.acquire(session)).tag == "committed"

    asyncio.run(after_restart())


def test_store_ttl_limits_and_busy(tmp_path) -> None:
    async def scenario() -> None:
        store = _store(tmp_path, max_sessions=2, ttl=60.0)
        first = await store.create("owner1")
        await store.create("owner1")
        with pytest.raises(ServingError) as full:
            await store.create("owner1")
        assert http_error(full.value).status == 429 and http_error(full.value).headers["Retry-After"]
        await store.acquire(first)
        with pytest.raises(ServingError) as busy:
            await store.acquire(first)
        assert busy.value.code == "session_busy"
        store.release(first)
        first.record.last_used -= 120
        assert await store.reap() == 1
        with pytest.raises(ServingError) as gone:
            store.get("owner1", first.id)
        assert http_error(gone.value).status == 404
        assert not os.path.exists(store.files.state_path(first.record))
        await store.create("owner1")

    asyncio.run(scenario())


def test_without_auto_create_an_unknown_session_is_404(tmp_path) -> None:
    import httpx
    from adapt_runtime.serving import ServerConfig, build_app, create_context

    ctx = create_context(ServerConfig(auto_create_sessions=False, session_dir=tmp_path, api_keys=("k",)))
    app = build_app(ctx)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     headers={"Authorization": "Bearer k"}) as http:
            unknown = await http.post("/v1/completions", headers={"X-Session-ID": "zed"},
                                      json={"prompt": "Hi", "max_tokens": 1})
            made = (await http.post("/v1/sessions")).json()["id"]
            known = await http.post("/v1/completions", headers={"X-Session-ID": made},
                                    json={"prompt": "Hi", "max_tokens": 1})
            return unknown, known

    try:
        unknown, known = asyncio.run(scenario())
    finally:
        ctx.engine.close()
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "session_not_found"
    assert known.status_code == 200
