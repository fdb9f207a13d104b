"""``PUT /v1/sessions/{id}/state`` against a live server: forged states are 400, states of other rule options 409,
the session keeps its state and the server keeps generating; the larger body limit belongs to that route alone;
client-named sessions come back after a restart and after ``kill -9``."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
import torch
from adapt_runtime.serving.edge.session_routes import is_state_route
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from serve_testing import KEY_A, MODEL, Server, assert_envelope

from adapt_runtime.state_validation import header_metadata

TEXT = ("The old lighthouse keeper counted seventeen gulls on the red roof every morning, and he wrote each "
        "number in a green notebook.")  # longer than one chunk: the state has S, pending rows and a KV cache
MAX_REQUEST = 65536
MODEL_POSITIONS = 512  # the bundled model's


@pytest.fixture(scope="module")
def server(launch, tmp_path_factory) -> Server:
    folder = tmp_path_factory.mktemp("sessions")
    return launch("--rule", "hebbian", "--rule-config", '{"lr": 5.0}', "--session-dir", str(folder),
                  "--max-request-bytes", str(MAX_REQUEST))


def score(server: Server, sid: str) -> list[float]:
    out = server.client().completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=0,
                                             extra_headers={"X-Session-ID": sid}, extra_body={"adapt": False})
    return out.choices[0].logprobs.token_logprobs[1:]


def read(server: Server, sid: str) -> None:
    server.client().completions.create(model=MODEL, prompt=TEXT, max_tokens=3, temperature=0,
                                       extra_headers={"X-Session-ID": sid})


def forge(data: bytes, edit) -> bytes:
    tensors, meta = dict(st_load(data)), header_metadata(data)
    counters = json.loads(meta["counters"])
    edit(tensors, meta, counters)
    meta["counters"] = json.dumps(counters)
    return st_save(tensors, metadata=meta)


def _nan(key):
    def edit(t, m, c):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")
    return edit


def _longer_than_the_model(t, m, c):
    n = MODEL_POSITIONS + 40
    t["tokens"] = torch.arange(n, dtype=torch.int64) % 200 + 3
    for key in [k for k in t if k.startswith("kv.")]:
        t[key] = t[key][:, :, :1].repeat(1, 1, n, 1).contiguous()
    c["kv_tokens"] = n
    for key in [k for k in t if k.startswith("pending.")]:
        del t[key]
    t["pending.positions"] = torch.zeros(0, dtype=torch.int64)
    c["pending_chunk"] = -1


def _options(t, m, c):
    config = json.loads(m["config"])
    config["options"]["target"] = "output"
    m["config"] = json.dumps(config)


FORGERIES = {
    "huge-S": lambda t, m, c: t.update({k: torch.full_like(v, 3e38) for k, v in t.items() if k.startswith("S.")}),
    "nan-last-logits": _nan("last_logits"),
    "nan-kv": _nan("kv.0.v"),
    "kv-longer-than-its-counter": lambda t, m, c: c.update(kv_tokens=c["kv_tokens"] - 2),
    "kv-longer-than-the-model": _longer_than_the_model,
    "token-outside-the-vocabulary": lambda t, m, c: t.update(tokens=t["tokens"] + 10**6),
    "negative-counter": lambda t, m, c: c.update(writes=-3),
    "pending-rows-of-the-wrong-shape": lambda t, m, c: t.update(
        {k: v[:, :-1].contiguous() for k, v in t.items() if k.startswith("pending.x.")}),
    # issue 17: a stream forged past its pending chunk (the gradient rule recomputed all of it on the model
    # thread), pending targets of the wrong shape, lying metadata, counters out of range
    "stream-past-the-pending-chunk": lambda t, m, c: (
        t.update(tokens=torch.arange(16_000, dtype=torch.int64) % 200 + 3),
        [t.pop(k) for k in [k for k in t if k.startswith("kv.")]], c.update(kv_tokens=0)),
    "pending-target-v-1d": lambda t, m, c: t.update({"pending.target.v": t["pending.target.v"][:, 0].contiguous()}),
    "pending-target-v-fewer-rows": lambda t, m, c: t.update(
        {"pending.target.v": t["pending.target.v"][:-1].contiguous()}),
    "pending-target-nll-2d": lambda t, m, c: t.update(
        {"pending.target.nll": t["pending.target.nll"][:, None].repeat(1, 64).contiguous()}),
    "pending-target-inv-rms-2d": lambda t, m, c: t.update(
        {"pending.target.inv_rms": t["pending.target.inv_rms"][:, None].repeat(1, 64).contiguous()}),
    "lying-shapes": lambda t, m, c: m.update(shapes=json.dumps([[1, 1]] * len(json.loads(m["shapes"])))),
    "refused-writes-1e30": lambda t, m, c: c.update(refused_writes=10**30),
}


@pytest.fixture(scope="module")
def exported(server) -> bytes:
    sid = server.new_session()
    read(server, sid)
    with server.http() as http:
        response = http.get(f"/v1/sessions/{sid}/state")
    assert response.status_code == 200
    tensors = st_load(response.content)
    for prefix in ("S.", "pending.x.", "kv.", "last_logits"):
        assert any(k.startswith(prefix) for k in tensors), (prefix, sorted(tensors))
    return response.content


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_a_forged_state_is_400_and_the_session_keeps_its_own(server, exported, case) -> None:
    sid = server.new_session()
    read(server, sid)
    before = score(server, sid)
    with server.http() as http:
        assert_envelope(http.put(f"/v1/sessions/{sid}/state", content=forge(exported, FORGERIES[case])), 400,
                        "invalid_state")
    assert score(server, sid) == before
    read(server, sid)  # the server still generates, in this session too


def test_a_state_of_other_rule_options_is_409(server, exported) -> None:
    sid = server.new_session()
    with server.http() as http:
        error = assert_envelope(http.put(f"/v1/sessions/{sid}/state", content=forge(exported, _options)), 409,
                                "session_incompatible")
    assert "target" in error["message"]
    read(server, sid)


def test_the_unforged_state_is_accepted(server, exported) -> None:
    sid = server.new_session()
    with server.http() as http:
        response = http.put(f"/v1/sessions/{sid}/state", content=forge(exported, lambda t, m, c: None))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/sessions/a/state"])
def test_the_state_route_is_recognised(path) -> None:
    assert is_state_route(path)


@pytest.mark.parametrize("path", ["/v1/completions/state", "/v1/sessions/a/b/state", "/v1/sessions/a/state/",
                                  "/state", "/v1/sessions//state", "/v1/sessions/a/statex", "/x/v1/sessions/a/state"])
def test_other_paths_keep_the_request_limit(path) -> None:
    assert not is_state_route(path)


def test_a_large_body_is_413_except_on_the_state_route(server) -> None:
    body = b"x" * (MAX_REQUEST + 1)
    with server.http() as http:
        for path in ("/v1/completions/state", "/v1/sessions/a/b/state"):
            assert_envelope(http.post(path, content=body), 413, "request_too_large")
        sid = server.new_session()
        assert_envelope(http.put(f"/v1/sessions/{sid}/state", content=body), 400, "invalid_state")


def test_client_named_sessions_come_back_after_kill_9(server) -> None:
    """The README's ``X-Session-ID: alice``; a clean restart is covered at the store level (one restart here)."""
    sid = "alice"
    read(server, sid)
    expected = score(server, sid)
    server.stop(signal.SIGKILL)
    server.start()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
        response = http.get(f"/v1/sessions/{sid}")
    assert response.status_code == 200, response.text
    assert response.json()["turns"] == 1
    assert score(server, sid) == expected


def test_a_long_stream_is_compacted_on_import(server, exported) -> None:
    """Issue 17, item 2: an imported stream keeps only what its KV cache and pending chunk cover, so what the
    session holds is what ``--session-memory-budget`` counts; its length and chunk alignment stay."""
    chunk = json.loads(header_metadata(exported)["chunk_size"])
    n = chunk * 20_000

    def prepend(t, m, c):
        t["tokens"] = torch.cat([torch.arange(n, dtype=torch.int64) % 200 + 3, t["tokens"]])
        t["pending.positions"] = t["pending.positions"] + n
        c["pending_chunk"] += n // chunk
        c["writes"] = 0

    original, sid = server.new_session(), server.new_session()
    with server.http() as http:
        assert http.put(f"/v1/sessions/{original}/state", content=exported).status_code == 200
        response = http.put(f"/v1/sessions/{sid}/state", content=forge(exported, prepend))
        assert response.status_code == 200, response.text
        short, long = http.get(f"/v1/sessions/{original}").json(), http.get(f"/v1/sessions/{sid}").json()
        assert long["tokens_seen"] == short["tokens_seen"] + n
        assert long["bytes"] == short["bytes"]
        again = http.get(f"/v1/sessions/{sid}/state")
    assert again.status_code == 200 and len(again.content) < len(exported) + 1024
    assert st_load(again.content)["tokens"].numel() == st_load(exported)["tokens"].numel()
    read(server, sid)
