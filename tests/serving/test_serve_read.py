"""``POST /v1/sessions/{id}/read`` and long prompts in a session: a document far over the context window read into
a session's fast weights, with progress, limits, one turn at a time and rollback."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from serve_testing import MODEL, Server, assert_envelope

import adapt_runtime as ar

CONTEXT = 128  # --max-model-len: a short context makes a 40-window document quick to read
MAX_READ = 8000


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--rule", "hebbian", "--max-model-len", str(CONTEXT), "--max-read-tokens", str(MAX_READ))


def document(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def info(server: Server, sid: str) -> dict:
    with server.http() as http:
        response = http.get(f"/v1/sessions/{sid}")
    assert response.status_code == 200, response.text
    return response.json()




def test_a_document_of_forty_windows_is_read_in_one_request(server: Server) -> None:
    sid = server.new_session()
    ids = document(42 * CONTEXT)
    with server.http() as http:
        response = http.post(f"/v1/sessions/{sid}/read", json={"tokens": ids})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "session.read" and body["session_id"] == sid and body["committed"] is True
    assert (body["tokens"], body["windows"], body["refused_writes"]) == (len(ids), 42, 0)
    assert body["writes"] == len(ids) // 32 - 1  # hebbian chunks of 32: the last chunk waits for its label
    assert len(body["window_nll"]) == 42 and all(x > 0 for x in body["window_nll"])
    assert body["seconds"] > 0 and body["mean_nll"] == pytest.approx(sum(body["window_nll"]) / 42, rel=1e-4)
    after = info(server, sid)
    assert (after["tokens_seen"], after["turns"], after["writes"]) == (len(ids), 1, body["writes"])


def test_the_session_holds_what_rt_read_computes(server: Server) -> None:
    sid = server.new_session()
    ids = document(5 * CONTEXT + 17, seed=1)
    with server.http() as http:
        assert http.post(f"/v1/sessions/{sid}/read", json={"tokens": ids, "window": 100}).status_code == 200
        exported = http.get(f"/v1/sessions/{sid}/state").content
    model, _ = ar.load_model("llama")
    rt = ar.patch(model, rule="hebbian")
    try:
        served = ar.state_from_bytes(exported, rt)
        local = rt.new_state()
        rt.read(ids, local, window=100)
    finally:
        rt.unpatch()
    assert served.tokens == local.tokens and served.writes == local.writes
    for layer in local.S:
        torch.testing.assert_close(served.S[layer], local.S[layer], rtol=1e-4, atol=1e-6)


def test_streamed_progress_then_the_result(server: Server) -> None:
    sid = server.new_session()
    with server.http() as http, http.stream("POST", f"/v1/sessions/{sid}/read",
                                            json={"text": "Once upon a time, a cat sat. " * 120,
                                                  "stream": True}) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[5:]) for line in lines[:-1]]
    progress, final = events[:-1], events[-1]
    assert final["object"] == "session.read" and final["committed"] is True
    assert [e["window"] for e in progress] == list(range(1, final["windows"] + 1)) and final["windows"] > 5
    assert progress[-1]["tokens_read"] == final["tokens"] == info(server, sid)["tokens_seen"]


def test_bad_input_and_limits(server: Server) -> None:
    sid = server.new_session()
    url = f"/v1/sessions/{sid}/read"
    with server.http() as http:
        assert_envelope(http.post(url, json={"text": "a", "tokens": [5]}), 400, "invalid_request")
        assert_envelope(http.post(url, json={}), 400, "invalid_request")
        assert_envelope(http.post(url, json={"tokens": [5, 99999]}), 400, "invalid_token_id")
        assert_envelope(http.post(url, json={"text": "", "add_special_tokens": False}), 400, "empty_document")
        assert_envelope(http.post(url, json={"tokens": [5] * (MAX_READ + 1)}), 400, "read_too_long")
        assert_envelope(http.post(url, json={"tokens": [5, 6], "window": CONTEXT + 1}), 400, "invalid_window")
        assert_envelope(http.post(url, json={"tokens": [5, 6], "windw": 8}), 400)
        assert_envelope(http.post("/v1/sessions/bad id!/read", json={"tokens": [5, 6]}), 400, "invalid_session_id")
        assert_envelope(httpx.post(f"{server.url}{url}", json={"tokens": [5, 6]}), 401)
    assert info(server, sid)["tokens_seen"] == 0


def _stream_read(http: httpx.Client, sid: str, n: int):
    return http.stream("POST", f"/v1/sessions/{sid}/read", json={"tokens": document(n, seed=2), "stream": True})


def test_a_read_is_a_turn_other_turns_get_409(server: Server) -> None:
    sid = server.new_session()
    with server.http() as http, _stream_read(http, sid, MAX_READ) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        with server.http() as other:
            busy = other.post("/v1/completions", headers={"X-Session-ID": sid}, json={"prompt": "Hi"})
            again = other.post(f"/v1/sessions/{sid}/read", json={"tokens": [5, 6]})
        assert_envelope(busy, 409, "session_busy")
        assert_envelope(again, 409, "session_busy")
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][5:])["committed"] is True


def test_a_client_that_goes_away_rolls_the_read_back(server: Server) -> None:
    sid = server.new_session()
    with server.http() as http:
        assert http.post(f"/v1/sessions/{sid}/read", json={"tokens": document(300)}).status_code == 200
    before = info(server, sid)
    with server.http() as http, _stream_read(http, sid, MAX_READ) as stream:
        data = [line for _, line in zip(range(4), stream.iter_lines())]
        assert any(line.startswith("data:") for line in data)
    after = server.wait_idle(sid)
    assert (after["tokens_seen"], after["turns"], after["writes"]) == (
        before["tokens_seen"], before["turns"], before["writes"])
    with server.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"/v1/sessions/{sid}/read", json={"tokens": document(MAX_READ)}, timeout=0.3)
    after = server.wait_idle(sid)
    assert (after["tokens_seen"], after["turns"]) == (before["tokens_seen"], before["turns"])


def test_a_chat_turn_after_a_read_uses_a_fresh_context(server: Server) -> None:
    sid = server.new_session()
    read = server.client().post(f"/sessions/{sid}/read", cast_to=object, body={"tokens": document(10 * CONTEXT)})
    assert read["windows"] == 10 and read["committed"] is True  # the openai client's raw post, as in the README
    reply = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                    max_tokens=8, extra_headers={"X-Session-ID": sid})
    assert reply.choices[0].finish_reason in ("stop", "length")
    after = info(server, sid)
    assert after["turns"] == 2 and after["tokens_seen"] > 10 * CONTEXT and after["kv_len"] < CONTEXT


def test_long_prompts_are_read_into_the_session_when_asked(server: Server) -> None:
    prompt = document(6 * CONTEXT, seed=3)
    client = server.client()
    with pytest.raises(Exception) as refused:  # the OpenAI behaviour stays without the opt-in
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_headers={"X-Session-ID": "lp-1"})
    assert getattr(refused.value, "status_code", None) == 400
    with server.http() as http:  # and without a session, even with it
        no_session = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "long_prompt": True})
        assert_envelope(no_session, 400, "context_length_exceeded")
        bad = http.post("/v1/completions", headers={"X-Session-ID": "lp-1"},
                        json={"prompt": prompt, "max_tokens": 4, "long_prompt": True, "echo": True})
        assert_envelope(bad, 400, "invalid_session_request")
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                    extra_headers={"X-Session-ID": "lp-1"},
                                    extra_body={"long_prompt": True, "ignore_eos": True})
    assert out.usage.prompt_tokens == CONTEXT - 4 and out.choices[0].finish_reason == "length"
    after = info(server, "lp-1")
    assert after["tokens_seen"] == len(prompt) + 3 and after["turns"] == 1  # the last sampled token is not fed
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tom " * 400}],
                                          max_tokens=4, extra_headers={"X-Session-ID": "lp-2"},
                                          extra_body={"long_prompt": True})
    assert chat.choices[0].message.content is not None and info(server, "lp-2")["tokens_seen"] > 400
