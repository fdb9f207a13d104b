"""``adapt-serve --state-rank R``: sessions hold rank-R factors end to end: completions learn, the state and the
adapter export and import as factors, a session written to disk continues identically after a restart (kill -9
included), and ``--session-memory-budget`` counts the factors, not d x f."""

from __future__ import annotations

import io
import json
import signal
import time
import zipfile

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from serve_testing import MODEL, Server, assert_envelope

import adapt_runtime as ar
from adapt_runtime.state_validation import header_metadata

RANK = 4
RULE_CONFIG = {"lr": 5.0}
TEXT = ("The old lighthouse keeper counted seventeen gulls on the red roof every morning, and he wrote each "
        "number in a green notebook that smelled of salt and pepper. One windy Tuesday a purple kite landed "
        "beside the lamp, carrying a note from a girl named Odile.")
MORE = "Odile asked the keeper to count the gulls again, and he found nineteen on the roof that evening."
# A session that read TEXT holds ~222 KB at rank 4 (its KV cache dominates; the factors are 11 KB) and would hold
# ~343 KB with a dense S (132 KB): one fits this budget only if the factors are what is counted, two do not fit.
BUDGET = 300_000


@pytest.fixture(scope="module")
def server(launch, tmp_path_factory) -> Server:
    folder = tmp_path_factory.mktemp("sessions")
    return launch("--rule", "hebbian", "--rule-config", json.dumps(RULE_CONFIG), "--state-rank", str(RANK),
                  "--session-dir", str(folder), "--session-memory-budget", str(BUDGET))


@pytest.fixture(scope="module")
def local() -> tuple[ar.Runtime, object]:
    """The same model and rule in this process: ``(rank-R runtime, tokenizer)``."""
    model, tokenizer = ar.load_model(MODEL)
    return ar.patch(model, rule="hebbian", state_rank=RANK, **RULE_CONFIG), tokenizer


def read(server: Server, sid: str, text: str = TEXT) -> None:
    server.client().completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0,
                                       extra_headers={"X-Session-ID": sid})


def score(server: Server, sid: str, text: str = TEXT) -> list[float]:
    out = server.client().completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=0,
                                             extra_headers={"X-Session-ID": sid}, extra_body={"adapt": False})
    return out.choices[0].logprobs.token_logprobs[1:]


def state_of(server: Server, sid: str) -> bytes:
    with server.http() as http:
        response = http.get(f"/v1/sessions/{sid}/state")
    assert response.status_code == 200, response.text
    return response.content


def wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_session_learns_and_its_state_holds_factors(server: Server, local) -> None:
    reader, fresh = server.new_session(), server.new_session()
    read(server, reader)
    assert max(abs(a - b) for a, b in zip(score(server, reader), score(server, fresh))) > 1e-2  # it learned
    data = state_of(server, reader)
    assert header_metadata(data)["state_rank"] == str(RANK)
    tensors = st_load(data)
    assert not any(k.startswith("S.") for k in tensors)
    rt, _ = local
    state = ar.state_from_bytes(data, rt)
    assert state.writes >= 1 and set(state.factors) == set(rt.config.layers)
    assert all(B.shape[1] <= RANK for B, _ in state.factors.values())
    assert server.session_info(reader)["bytes"] == state.nbytes


def test_the_budget_counts_the_factors_and_an_evicted_session_comes_back_identically(server: Server, local) -> None:
    first = server.new_session()
    read(server, first)
    before = score(server, first)
    info = server.session_info(first)
    rt, _ = local
    state = ar.state_from_bytes(state_of(server, first), rt)
    factor_bytes = sum(t.numel() * t.element_size() for pair in state.factors.values() for t in pair)
    dense_bytes = sum(4 * d * f for d, f in rt.state_spec.shapes)
    assert info["bytes"] <= BUDGET < info["bytes"] - factor_bytes + dense_bytes  # d x f would not have fit
    others = [server.new_session() for _ in range(2)]
    for sid in others:
        read(server, sid)
    wait_for(lambda: not server.session_info(first)["resident"])  # spilled to disk, least recently used first
    latest = server.session_info(others[-1])
    assert latest["resident"] and latest["bytes"] <= BUDGET
    assert score(server, first) == before  # read back from its state file


def test_a_session_continues_identically_after_a_kill_and_a_restart(server: Server) -> None:
    survivor, reference = server.new_session(), server.new_session()
    for sid in (survivor, reference):
        read(server, sid)
    read(server, reference, MORE)  # the turn the survivor takes after the restart
    expected = score(server, reference)
    assert score(server, survivor) != expected
    server.stop(signal.SIGKILL)  # no flush: what a turn acknowledged is on disk already
    server.start()
    read(server, survivor, MORE)
    assert score(server, survivor) == pytest.approx(expected, abs=1e-5)
    assert server.session_info(survivor)["writes"] == server.session_info(reference)["writes"]


def test_an_exported_state_imports_and_a_forged_or_dense_one_is_refused(server: Server, local) -> None:
    source, target = server.new_session(), server.new_session()
    read(server, source)
    data = state_of(server, source)
    expected = score(server, source)
    with server.http() as http:
        imported = http.put(f"/v1/sessions/{target}/state", content=data)
        assert imported.status_code == 200, imported.text
        assert score(server, target) == expected
        tensors, meta = dict(st_load(data)), header_metadata(data)
        key = next(k for k in tensors if k.startswith("B."))
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        assert_envelope(http.put(f"/v1/sessions/{target}/state", content=st_save(tensors, metadata=meta)), 400,
                        "invalid_state")
        model, _ = ar.load_model(MODEL)
        dense = ar.patch(model, rule="hebbian", **RULE_CONFIG)
        assert_envelope(http.put(f"/v1/sessions/{target}/state", content=dense.new_state().to_bytes()), 409)
    assert score(server, target) == expected  # refused imports left the session as it was


def test_the_adapter_is_the_sessions_factors_and_seeds_a_session(server: Server, local, tmp_path) -> None:
    source, target = server.new_session(), server.new_session()
    read(server, source)
    state = ar.state_from_bytes(state_of(server, source), local[0])
    with server.http() as http:
        response = http.get(f"/v1/sessions/{source}/adapter")
        assert response.status_code == 200, response.text
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            content = {name: archive.read(name) for name in archive.namelist()}
        config = json.loads(content["adapter_config.json"])
        assert config["r"] == config["lora_alpha"] == int(response.headers["x-adapter-rank"]) <= RANK
        weights = st_load(content["adapter_model.safetensors"])
        for layer, (B, A) in state.factors.items():
            prefix = f"base_model.model.model.layers.{layer}.mlp.down_proj"
            k = B.shape[1]
            assert torch.equal(weights[f"{prefix}.lora_B.weight"][:, :k], B)
            assert torch.equal(weights[f"{prefix}.lora_A.weight"][:k], A)
        imported = http.put(f"/v1/sessions/{target}/adapter", content=response.content)
        assert imported.status_code == 200, imported.text
    seeded = score(server, target)
    for name, data in content.items():  # the runtime, here, with the same adapter gives the same logprobs
        (tmp_path / name).write_bytes(data)
    rt, tokenizer = local
    ids = tokenizer(TEXT).input_ids
    logprobs = torch.log_softmax(rt.forward(ids, ar.import_lora(rt, tmp_path), adapt=False)[0], -1)
    assert seeded == pytest.approx([float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4)


def test_bad_state_ranks_are_refused() -> None:
    from adapt_runtime.serving.cli import main
    from adapt_runtime.serving.config import ServerConfig
    from click.testing import CliRunner

    runner = CliRunner()
    assert "--state-rank" in runner.invoke(main, ["--help"]).output
    bad = runner.invoke(main, ["--state-rank", "0"])
    assert bad.exit_code == 2 and "state_rank" in bad.output

    assert ServerConfig(state_rank=16).patch_options == {"state_rank": 16}
    assert ServerConfig(rule_config={"lr": 1.0}).patch_options == {"lr": 1.0}
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="state_rank"):
            ServerConfig(state_rank=bad)
    with pytest.raises(ValueError, match="state_rank"):
        ServerConfig(state_rank=8, rule_config={"state_rank": 16})
