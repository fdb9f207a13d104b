"""``/v1/sessions/{id}/adapter``: a session's memory out as a PEFT LoRA zip, and a session seeded from one."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from serve_testing import KEY_A, KEY_B, MODEL, Server, assert_envelope

import adapt_runtime as ar

TEXT = "Lily and Tom went to the park. They played with a red ball under the big tree until the sun went down."


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--rule", "hebbian", "--rule-config", '{"lr": 5.0}')


def read(server: Server, sid: str) -> None:
    server.client().completions.create(model=MODEL, prompt=TEXT * 3, max_tokens=1, temperature=0,
                                       extra_headers={"X-Session-ID": sid})


def score(server: Server, sid: str) -> list[float]:
    out = server.client().completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=0,
                                             extra_headers={"X-Session-ID": sid}, extra_body={"adapt": False})
    return out.choices[0].logprobs.token_logprobs[1:]


def files(zipped: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def zipped(content: dict[str, bytes], folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in content.items():
            archive.writestr(folder + name, data)
    return buffer.getvalue()


def test_exported_adapter_seeds_a_session_with_the_same_memory(server: Server, tmp_path) -> None:
    source, target = server.new_session(), server.new_session()
    read(server, source)
    with server.http() as http:
        response = http.get(f"/v1/sessions/{source}/adapter")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/zip"
        content = files(response.content)
        assert set(content) == {"adapter_config.json", "adapter_model.safetensors"}
        assert json.loads(content["adapter_config.json"])["r"] == int(response.headers["x-adapter-rank"])
        fresh = score(server, target)
        imported = http.put(f"/v1/sessions/{target}/adapter", content=zipped(content, "memory/"))
    assert imported.status_code == 200, imported.text
    assert imported.json()["tokens_seen"] == 0
    seeded = score(server, target)
    assert max(abs(a - b) for a, b in zip(seeded, fresh)) > 1e-3  # the memory is there
    for name, data in content.items():  # the runtime, locally, with the same adapter gives the same logprobs
        (tmp_path / name).write_bytes(data)
    model, tokenizer = ar.load_model("llama")
    rt = ar.patch(model, rule="hebbian", lr=5.0)
    ids = tokenizer(TEXT).input_ids
    logprobs = torch.log_softmax(rt.forward(ids, ar.import_lora(rt, tmp_path), adapt=False)[0], -1)
    expected = [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert seeded == pytest.approx(expected, abs=1e-4)


def test_rank_query_gives_a_smaller_adapter_and_bad_ranks_are_400(server: Server) -> None:
    sid = server.new_session()
    read(server, sid)
    with server.http() as http:
        full = http.get(f"/v1/sessions/{sid}/adapter")
        low = http.get(f"/v1/sessions/{sid}/adapter", params={"rank": 2})
        assert low.status_code == 200 and low.headers["x-adapter-rank"] == "2"
        assert int(full.headers["x-adapter-rank"]) > 2 and len(low.content) < len(full.content)
        assert json.loads(files(low.content)["adapter_config.json"])["r"] == 2
        for bad in ("0", "-1", "two"):
            assert_envelope(http.get(f"/v1/sessions/{sid}/adapter", params={"rank": bad}), 400)


def test_bad_adapters_are_refused_and_the_state_is_unchanged(server: Server) -> None:
    sid = server.new_session()
    read(server, sid)
    with server.http() as http:
        good = files(http.get(f"/v1/sessions/{sid}/adapter").content)
        before = score(server, sid)
        config = json.loads(good["adapter_config.json"])
        dora = {**good, "adapter_config.json": json.dumps({**config, "use_dora": True}).encode()}
        other = {**good, "adapter_config.json": json.dumps({**config, "target_modules": ["q_proj"]}).encode()}
        url = f"/v1/sessions/{sid}/adapter"
        assert_envelope(http.put(url, content=b""), 400, "invalid_adapter")
        assert_envelope(http.put(url, content=b"not a zip"), 400, "invalid_adapter")
        assert_envelope(http.put(url, content=zipped({"adapter_config.json": good["adapter_config.json"]})), 400,
                        "invalid_adapter")
        assert_envelope(http.put(url, content=zipped({**good, "adapter_config.json": b"{"})), 400,
                        "invalid_adapter")
        assert_envelope(http.put(url, content=zipped(dora)), 409, "adapter_incompatible")
        assert_envelope(http.put(url, content=zipped(other)), 409, "adapter_incompatible")
        bomb = zipped({**good, "adapter_model.safetensors": bytes(64 * 2**20)})  # a few KB, 64 MiB unpacked
        assert len(bomb) < 2**20
        assert_envelope(http.put(url, content=bomb), 413, "request_too_large")
    assert score(server, sid) == before


def test_another_key_gets_404_for_the_adapter_routes(server: Server) -> None:
    sid = server.new_session(KEY_A)
    with server.http(KEY_A) as http:
        good = http.get(f"/v1/sessions/{sid}/adapter").content
    with server.http(KEY_B) as http:
        assert_envelope(http.get(f"/v1/sessions/{sid}/adapter"), 404, "session_not_found")
        assert_envelope(http.put(f"/v1/sessions/{sid}/adapter", content=good), 404, "session_not_found")
        assert_envelope(http.get("/v1/sessions/never-made/adapter"), 404, "session_not_found")
