"""Session lifecycle, ownership, one turn at a time, rollback, export/import, eviction and restart."""

from __future__ import annotations

import json
import re
import signal
import time

import httpx
import openai
import pytest
from safetensors import safe_open
from safetensors.torch import save as st_save
from serve_testing import KEY_A, KEY_B, MODEL, Server, assert_envelope

TEXT = ("The old lighthouse keeper counted seventeen gulls on the red roof every morning, and he wrote each "
        "number in a green notebook that smelled of salt and pepper.")
SESSION_ID = re.compile(r"^sess_[A-Za-z0-9_-]{16,64}$")


@pytest.fixture(scope="module")
def server(launch, tmp_path_factory) -> Server:
    folder = tmp_path_factory.mktemp("sessions")
    return launch("--rule", "hebbian", "--rule-config", '{"lr": 5.0, "layers": "all"}', "--session-dir", str(folder),
                  "--session-memory-budget", "2M")


def score(server: Server, sid: str, text: str = TEXT, key: str = KEY_A) -> list[float]:
    out = server.client(key).completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=0,
                                                extra_headers={"X-Session-ID": sid}, extra_body={"adapt": False})
    return out.choices[0].logprobs.token_logprobs[1:]


def read(server: Server, sid: str, text: str = TEXT, max_tokens: int = 1) -> openai.types.Completion:
    return server.client().completions.create(model=MODEL, prompt=text, max_tokens=max_tokens, temperature=0,
                                              extra_headers={"X-Session-ID": sid})


def info(server: Server, sid: str, key: str = KEY_A) -> dict:
    with server.http(key) as http:
        response = http.get(f"/v1/sessions/{sid}")
    assert response.status_code == 200, response.text
    return response.json()


def test_lifecycle_create_get_list_reset_delete(server: Server) -> None:
    with server.http() as http:
        created = http.post("/v1/sessions", json={"metadata": {"user": "ada"}})
        assert created.status_code == 201
        sid = created.json()["id"]
        assert SESSION_ID.match(sid) and created.json()["metadata"] == {"user": "ada"}
        read(server, sid)
        assert info(server, sid)["turns"] == 1 and info(server, sid)["tokens_seen"] > 0
        assert sid in [s["id"] for s in http.get("/v1/sessions").json()["data"]]
        reset = http.post(f"/v1/sessions/{sid}/reset").json()
        assert reset["tokens_seen"] == 0 and reset["writes"] == 0
        deleted = http.delete(f"/v1/sessions/{sid}").json()
        assert deleted == {"id": sid, "object": "session.deleted", "deleted": True}
        assert_envelope(http.get(f"/v1/sessions/{sid}"), 404, "session_not_found")


def test_session_id_by_header_or_body_and_echoed(server: Server) -> None:
    sid = server.new_session()
    client = server.client()
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2,
                                                      extra_body={"session_id": sid})
    assert raw.headers["x-session-id"] == sid
    assert json.loads(raw.text)["session_id"] == sid
    first = next(iter(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=2, stream=True,
                                                     extra_headers={"X-Session-ID": sid})))
    assert first.model_extra["session_id"] == sid
    other = server.new_session()
    with server.http() as http:
        clash = http.post("/v1/completions", headers={"X-Session-ID": sid},
                          json={"prompt": "Hi", "max_tokens": 1, "session_id": other})
    assert_envelope(clash, 400, "session_id_mismatch")
    assert info(server, sid)["turns"] == 2


@pytest.mark.parametrize("sid", ["bad id!", "../../etc/passwd", ".hidden", "x" * 129],
                         ids=["punctuation", "path-traversal", "leading-dot", "too-long"])
def test_malformed_session_ids_are_400(server: Server, sid: str) -> None:
    with server.http() as http:
        response = http.post("/v1/completions", headers={"X-Session-ID": sid}, json={"prompt": "Hi"})
    assert_envelope(response, 400, "invalid_session_id")


def test_unknown_ids_are_404_on_session_routes(server: Server) -> None:
    with server.http() as http:
        for response in (http.get("/v1/sessions/never-made"), http.delete("/v1/sessions/never-made"),
                         http.post("/v1/sessions/never-made/fork"), http.get("/v1/sessions/never-made/state")):
            assert_envelope(response, 404, "session_not_found")


def test_client_chosen_ids_are_created_on_use_per_key(server: Server) -> None:
    read(server, "alice")
    mine = info(server, "alice")
    assert mine["turns"] == 1
    theirs = server.client(KEY_B).completions.create(model=MODEL, prompt="Hi", max_tokens=1,
                                                     extra_headers={"X-Session-ID": "alice"})
    assert theirs.model_extra["session_id"] == "alice"
    assert info(server, "alice", KEY_B)["turns"] == 1
    assert info(server, "alice")["tokens_seen"] == mine["tokens_seen"], "another key never touches this one"
    assert score(server, "alice", key=KEY_B) != score(server, "alice")


def test_another_key_gets_404_and_never_the_owners_state(server: Server) -> None:
    sid = server.new_session(KEY_A)
    with server.http(KEY_B) as http:
        calls = [http.get(f"/v1/sessions/{sid}"), http.delete(f"/v1/sessions/{sid}"),
                 http.post(f"/v1/sessions/{sid}/reset"), http.post(f"/v1/sessions/{sid}/fork"),
                 http.get(f"/v1/sessions/{sid}/state"), http.put(f"/v1/sessions/{sid}/state", content=b"x")]
        listed = http.get("/v1/sessions").json()["data"]
    for response in calls:
        assert_envelope(response, 404, "session_not_found")
    assert sid not in [s["id"] for s in listed]
    read(server, sid)
    server.client(KEY_B).completions.create(model=MODEL, prompt="A frog sat on a log.", max_tokens=1,
                                            extra_headers={"X-Session-ID": sid})
    assert info(server, sid)["turns"] == 1, "the other key's turn went to its own namespace"
    assert score(server, sid, key=KEY_B) != score(server, sid)


def _stream_lines(http: httpx.Client, sid: str, max_tokens: int = 200):
    body = {"prompt": TEXT, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    return http.stream("POST", "/v1/completions", headers={"X-Session-ID": sid}, json=body)


def test_a_second_concurrent_turn_gets_409(server: Server) -> None:
    sid = server.new_session()
    with server.http() as http, _stream_lines(http, sid) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        with server.http() as other:
            busy = other.post("/v1/completions", headers={"X-Session-ID": sid}, json={"prompt": "Hi"})
        assert_envelope(busy, 409, "session_busy")
        assert busy.headers["retry-after"]
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert info(server, sid)["turns"] == 1




def test_disconnect_rolls_the_turn_back(server: Server) -> None:
    sid = server.new_session()
    read(server, sid)
    before, logprobs = info(server, sid), score(server, sid)
    with server.http() as http, _stream_lines(http, sid, max_tokens=400) as stream:
        data = [line for _, line in zip(range(6), stream.iter_lines())]
        assert any(line.startswith("data:") for line in data)
    after = server.wait_idle(sid)
    assert (after["tokens_seen"], after["turns"], after["writes"]) == (
        before["tokens_seen"], before["turns"], before["writes"])
    assert score(server, sid) == logprobs


def test_a_whole_response_abandoned_by_its_client_rolls_back(server: Server) -> None:
    sid = server.new_session()
    read(server, sid)
    before = info(server, sid)
    body = {"prompt": TEXT, "max_tokens": 400, "ignore_eos": True}
    with server.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", headers={"X-Session-ID": sid}, json=body, timeout=0.3)
    after = server.wait_idle(sid)
    assert (after["tokens_seen"], after["turns"]) == (before["tokens_seen"], before["turns"])


def test_a_prompt_that_extends_the_stream_reads_only_the_suffix(server: Server) -> None:
    sid = server.new_session()
    with server.http() as http:
        ids = http.post("/tokenize", json={"prompt": TEXT}).json()["tokens"]
        more = http.post("/tokenize", json={"prompt": " Then it rained.", "add_special_tokens": False}).json()
    read(server, sid, ids)
    assert info(server, sid)["tokens_seen"] == len(ids)
    read(server, sid, ids + more["tokens"])
    assert info(server, sid)["tokens_seen"] == len(ids) + more["count"]
    writes = info(server, sid)["writes"]
    read(server, sid, "A new story about a frog.")
    diverged = info(server, sid)
    assert diverged["tokens_seen"] > len(ids) + more["count"], "a diverging prompt is read on top of the stream"
    assert diverged["writes"] > writes, "reading a new prompt writes the fast weights"


def test_a_chat_turn_that_repeats_the_history_reads_only_the_new_messages(server: Server) -> None:
    sid = "chat-" + str(time.monotonic_ns())
    client = server.client()
    history = [{"role": "user", "content": "Tell me about a cat called Tom."}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=24, temperature=0,
                                           extra_headers={"X-Session-ID": sid})
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "What did Tom do next?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0,
                                            extra_headers={"X-Session-ID": sid})
    assert info(server, sid)["tokens_seen"] == second.usage.prompt_tokens + second.usage.completion_tokens - 1


def test_export_import_gives_identical_logprobs(server: Server) -> None:
    source, target = server.new_session(), server.new_session()
    read(server, source)
    with server.http() as http:
        exported = http.get(f"/v1/sessions/{source}/state")
        assert exported.headers["content-type"] == "application/octet-stream"
        imported = http.put(f"/v1/sessions/{target}/state", content=exported.content)
    assert imported.status_code == 200, imported.text
    assert score(server, target) == score(server, source)
    assert info(server, target)["tokens_seen"] == info(server, source)["tokens_seen"]


def test_import_rejects_bad_bytes_and_foreign_metadata(server: Server, tmp_path) -> None:
    sid = server.new_session()
    read(server, sid)
    with server.http() as http:
        good = http.get(f"/v1/sessions/{sid}/state").content
        path = tmp_path / "state.safetensors"
        path.write_bytes(good)
        with safe_open(str(path), "pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            metadata = dict(handle.metadata())
        forged = st_save(tensors, metadata={**metadata, "fingerprint": "another-model"})
        before = score(server, sid)
        assert_envelope(http.put(f"/v1/sessions/{sid}/state", content=b"not a state"), 400, "invalid_state")
        assert_envelope(http.put(f"/v1/sessions/{sid}/state", content=forged), 409, "session_incompatible")
        assert_envelope(http.put(f"/v1/sessions/{sid}/state", content=b""), 400, "invalid_state")
    assert score(server, sid) == before


def test_fork_copies_memory_and_then_diverges(server: Server) -> None:
    sid = server.new_session()
    read(server, sid)
    with server.http() as http:
        forked = http.post(f"/v1/sessions/{sid}/fork")
    assert forked.status_code == 201
    fork = forked.json()["id"]
    assert fork != sid and score(server, fork) == score(server, sid)
    original = score(server, sid)
    read(server, fork, "A small frog sang to the moon every night until the sun came up.")
    assert score(server, sid) == original
    assert score(server, fork) != original


def test_evicted_sessions_come_back_unchanged(server: Server) -> None:
    sid = server.new_session()
    read(server, sid)
    expected = score(server, sid)
    others = [server.new_session() for _ in range(6)]
    for other in others:
        read(server, other)
    deadline = time.monotonic() + 20
    while info(server, sid)["resident"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not info(server, sid)["resident"], "the least recently used session should be on disk"
    assert score(server, sid) == expected


def test_restart_after_a_crash_finds_every_session(server: Server) -> None:
    sessions = [server.new_session() for _ in range(3)]
    for sid in sessions:
        read(server, sid)
    expected = {sid: score(server, sid) for sid in sessions}
    server.stop(signal.SIGKILL)
    server.start()
    for sid in sessions:
        assert info(server, sid)["turns"] == 1
        assert score(server, sid) == expected[sid]
    with server.http(KEY_B) as http:
        assert_envelope(http.get(f"/v1/sessions/{sessions[0]}"), 404, "session_not_found")
