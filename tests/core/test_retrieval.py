"""The delta form's retrieval ``X S^T`` taken from the forward: a dense state read several tokens per call records
``S x`` as its layers apply it (``Chunk.retrieved``), and the write subtracts that record instead of forming the
product with S again. The writes are those of the product formed at the write (float rounding apart), a state file
keeps the record, and a chunk read one token at a time (no record) still writes as ever."""

from __future__ import annotations

import pytest
import torch

import adapt_runtime as ar
from adapt_runtime import kernels
from adapt_runtime.chunk import RETRIEVAL_KEY

CHUNK = 8


@pytest.fixture(scope="module")
def model():
    return ar.load_model("llama")[0]


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def rt(model):
    runtime = ar.patch(model, rule="hebbian", chunk_size=CHUNK, layers="all")
    yield runtime
    runtime.unpatch()


def erases(monkeypatch) -> list[float]:
    """The ``erase`` of every ``kernels.write`` call from now on (0: the retrieval, if any, came with the targets)."""
    seen: list[float] = []
    real = kernels.write

    def spy(*args, **kwargs):
        seen.append(kwargs.get("erase", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "write", spy)
    return seen


def test_a_chunk_read_in_one_call_writes_from_its_recorded_retrieval(rt, monkeypatch):
    state = rt.new_state()
    rt.forward(ids(CHUNK * 2), state)  # chunk 0 written when chunk 1 starts (S was zero: nothing to retrieve)
    assert set(state.pending.retrieved) == set(rt.plastic)  # chunk 1 read under a nonzero S: recorded
    assert all(sum(len(p) for p in pieces) == CHUNK for pieces in state.pending.retrieved.values())
    seen = erases(monkeypatch)
    rt.forward(ids(CHUNK, seed=1), state)  # chunk 1's write: its retrieval is the record
    assert seen and all(e == 0.0 for e in seen)


def test_with_the_record_off_the_kernel_retrieves(rt, monkeypatch):
    rt.record_retrieval = False  # as before the record (benchmarks compare the two)
    state = rt.new_state()
    rt.forward(ids(CHUNK * 2), state)
    assert not state.pending.retrieved
    seen = erases(monkeypatch)
    rt.forward(ids(CHUNK, seed=1), state)
    assert seen and all(e > 0 for e in seen)


def test_token_by_token_has_no_record_and_the_kernel_retrieves(rt, monkeypatch):
    state = rt.new_state()
    rt.forward(ids(CHUNK * 2), state)
    seen = erases(monkeypatch)
    for k in range(CHUNK):  # chunk 2 read one token at a time: W0 + S merged, no record
        rt.forward(ids(CHUNK * 3, seed=2)[:, k : k + 1], state)
    rt.forward(ids(1, seed=3), state)
    assert seen and all(e > 0 for e in seen[-len(rt.plastic):])


def test_the_recorded_retrieval_writes_what_the_product_at_the_write_does(rt):
    """The same stream read in chunk-sized calls (the record) and one token per call (the product at the write):
    every layer's S the same to float rounding, after several delta writes."""
    stream = ids(CHUNK * 6 + 1, seed=4)
    chunked, single = rt.new_state(), rt.new_state()
    for k in range(0, stream.shape[1], CHUNK):
        rt.forward(stream[:, k : k + CHUNK], chunked)
    for k in range(stream.shape[1]):
        rt.forward(stream[:, k : k + 1], single)
    assert chunked.writes == single.writes == 6
    for i in rt.plastic:
        scale = float(single.S[i].norm())
        assert scale > 0 and float((chunked.S[i] - single.S[i]).norm()) <= 1e-4 * scale


def test_a_state_file_keeps_the_record_and_continues_bit_for_bit(rt, tmp_path):
    state = rt.new_state()
    rt.forward(ids(CHUNK * 2 + 3), state)  # 3 positions pending, recorded
    path = tmp_path / "s.safetensors"
    state.save(path)
    loaded = ar.load_state(path, rt)
    assert set(loaded.pending.retrieved) == set(state.pending.retrieved)
    for i, pieces in state.pending.retrieved.items():
        assert torch.equal(torch.cat(pieces), torch.cat(loaded.pending.retrieved[i]))
    nxt = ids(CHUNK * 2, seed=5)
    assert torch.equal(rt.forward(nxt, state), rt.forward(nxt, loaded))
    for i in rt.plastic:
        assert torch.equal(state.S[i], loaded.S[i])


@pytest.mark.parametrize("damage", ["rows", "width", "nan"])
def test_a_damaged_record_in_a_state_file_is_refused(rt, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    state = rt.new_state()
    rt.forward(ids(CHUNK * 2 + 3), state)
    path = tmp_path / "s.safetensors"
    state.save(path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    key = next(k for k in tensors if k.startswith(f"pending.{RETRIEVAL_KEY}."))
    t = tensors[key]
    tensors[key] = {"rows": t[:-1], "width": t[:, :-1], "nan": t.clone().fill_(float("nan"))}[damage].contiguous()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ar.StateFileError):
        ar.load_state(path, rt)
