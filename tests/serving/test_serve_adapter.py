"""``/v1/sessions/{id}/adapter``: a session's memory out as a PEFT LoRA zip, and a session seeded from one."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
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


def with_factors(good: dict[str, bytes], value: float, **config) -> dict[str, bytes]:
    """The adapter with every entry of its factors set to ``value`` (S = (alpha/r) B A: r * value^2)."""
    tensors = st_load(good["adapter_model.safetensors"])
    for tensor in tensors.values():
        tensor.fill_(value)
    settings = {**json.loads(good["adapter_config.json"]), **config}
    return {"adapter_config.json": json.dumps(settings).encode(), "adapter_model.safetensors": st_save(tensors)}


def corrupt_stream(content: dict[str, bytes], method: int, skip: int) -> bytes:
    """A zip of ``content`` compressed with ``method`` whose config's stream is damaged ``skip`` bytes into its
    data (a deflate block of the reserved type 3; an LZMA range coder that does not start with 0)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in content.items():
            archive.writestr(name, data)
    data = bytearray(buffer.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("adapter_config.json")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + skip
    data[start : start + 4] = b"\xff\xff\xff\xff"
    return bytes(data)


def test_adapters_beyond_the_s_bound_or_damaged_are_400_and_the_session_still_serves(server: Server) -> None:
    """S = (alpha/r) B A is checked as a state import checks S (huge factors or alpha would make every later turn
    a 500, and 1e3 factors a session that cannot load after a restart); a damaged archive or a config nested too
    deep is a bad adapter, not a 500."""
    sid = server.new_session()
    read(server, sid)
    url = f"/v1/sessions/{sid}/adapter"
    with server.http() as http:
        good = files(http.get(url).content)
        before = score(server, sid)
        huge = with_factors(good, 1e19)  # S of r * 1e38: inf in float32
        above = with_factors(good, 1e3)  # S of r * 1e6: finite, above the bound of a state import
        alpha = with_factors(good, 1.0, lora_alpha=1e308)
        for bad, why in ((huge, "non-finite"), (above, "above the bound"), (alpha, "non-finite")):
            assert why in assert_envelope(http.put(url, content=zipped(bad)), 400, "invalid_adapter")["message"]
        for nested in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
            assert_envelope(http.put(url, content=zipped({**good, "adapter_config.json": nested.encode()})), 400,
                            "invalid_adapter")
        assert_envelope(http.put(url, content=corrupt_stream(good, zipfile.ZIP_DEFLATED, 0)), 400, "invalid_adapter")
        assert_envelope(http.put(url, content=corrupt_stream(good, zipfile.ZIP_LZMA, 9)), 400, "invalid_adapter")
        assert score(server, sid) == before
        again = http.put(url, content=zipped(good))  # the session's own export still imports
        assert again.status_code == 200, again.text
    assert score(server, sid) == pytest.approx(before, abs=1e-4)
    out = server.client().completions.create(model=MODEL, prompt="Lily", max_tokens=2, temperature=0,
                                             extra_headers={"X-Session-ID": sid})
    assert out.choices[0].text is not None
