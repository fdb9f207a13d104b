"""State objects and files: clone, reset, round trip, mismatch and corruption errors, non-finite writes."""

from __future__ import annotations

import pytest
import torch
from core_testing import patched, tiny_model, tokens

import adapt_runtime as ar
from adapt_runtime.rules import HebbianRule


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_save_load_round_trip_continues_identically(rule, tmp_path):
    rt = patched(rule, chunk_size=6)
    state = rt.new_state()
    rt.forward(tokens(20), state)  # ends mid-chunk: pending rows and a deferred label are saved too
    path = tmp_path / "s.safetensors"
    state.save(path)
    loaded = ar.load_state(path, rt)
    assert loaded.tokens == state.tokens and loaded.writes == state.writes and loaded.kv_len == state.kv_len
    nxt = tokens(15, seed=4)
    torch.testing.assert_close(rt.forward(nxt, loaded), rt.forward(nxt, state), atol=0, rtol=0)
    for layer in state.spec.layers:
        torch.testing.assert_close(loaded.S[layer], state.S[layer], atol=0, rtol=0)


def test_bytes_round_trip_and_clone_is_independent():
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    rt.forward(tokens(13), state)
    copy = ar.state_from_bytes(state.to_bytes(), rt)
    fork = state.clone()
    rt.forward(tokens(9, seed=2), fork)
    assert fork.writes > state.writes == copy.writes
    for layer in state.spec.layers:
        assert torch.equal(copy.S[layer], state.S[layer])
        assert not torch.equal(fork.S[layer], state.S[layer])


def test_reset_returns_to_base():
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    rt.forward(tokens(20), state)
    state.reset()
    assert state.is_zero and state.tokens_seen == 0 and state.kv_len == 0 and state.writes == 0
    fresh = rt.forward(tokens(4), rt.new_state())
    assert torch.equal(rt.forward(tokens(4), state), fresh)


def test_nbytes_counts_fast_weights_and_cache():
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    assert state.nbytes == 0
    rt.forward(tokens(9), state)
    d, f = state.spec.shapes[0]
    assert state.nbytes > len(state.spec.layers) * d * f * 4


@pytest.mark.parametrize("change", ["rule", "chunk_size", "layers", "model"])
def test_mismatched_file_is_refused(change, tmp_path):
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    rt.forward(tokens(9), state)
    path = tmp_path / "s.safetensors"
    state.save(path)
    other = {
        "rule": lambda: patched("gradient", chunk_size=4),
        "chunk_size": lambda: patched("hebbian", chunk_size=5),
        "layers": lambda: patched("hebbian", chunk_size=4, layers="last:1"),
        "model": lambda: ar.patch(tiny_model(seed=1), rule="hebbian", chunk_size=4),
    }[change]()
    what = {"rule": "the rule", "chunk_size": "the chunk size", "layers": "the plastic layers",
            "model": "the base model fingerprint"}[change]
    with pytest.raises(ar.IncompatibleStateError, match=f"does not match this runtime: {what} is"):
        ar.load_state(path, other)
    assert ar.load_state(path, rt).tokens == state.tokens  # the file itself is intact for its own runtime


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped-header", "missing"])
def test_corrupt_file_is_a_clear_error(damage, tmp_path):
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    rt.forward(tokens(9), state)
    path = tmp_path / "s.safetensors"
    state.save(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a state file at all")
    elif damage == "flipped-header":
        path.write_bytes(data[:8] + b"}" + data[9:])
    else:
        path.unlink()
    with pytest.raises(ar.StateFileError):
        ar.load_state(path, rt)


def test_save_is_atomic(tmp_path, monkeypatch):
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    rt.forward(tokens(9), state)
    path = tmp_path / "s.safetensors"
    state.save(path)
    before = path.read_bytes()
    rt.forward(tokens(9, seed=3), state)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError):
        state.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


class PoisonRule(HebbianRule):
    """A Hebbian rule whose targets turn non-finite: the write must be refused, whole."""

    def write(self, chunk):
        writes = super().write(chunk)
        writes[-1].V = writes[-1].V * float("nan")
        return writes


def test_non_finite_write_is_refused_and_counted(caplog):
    rt = ar.patch(tiny_model(), rule=PoisonRule(), chunk_size=4, lr=1.0)
    state = rt.new_state()
    with caplog.at_level("WARNING", logger="adapt_runtime"):
        logits = rt.forward(tokens(13), state)
    assert state.refused_writes == 3 and state.writes == 0 and state.is_zero
    assert torch.isfinite(logits).all()
    assert "refused" in caplog.text
