"""State files of a rank-r runtime (``state_rank``): each layer's factors ``B.<layer>``, ``A.<layer>`` with the rank
in the metadata; the round trip is exact, forged factors are refused as forged S is, and a file of another state
rank (dense included) does not load."""

from __future__ import annotations

import json

import pytest
import torch
from core_testing import assert_close, patched, tokens
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import adapt_runtime as ar
from adapt_runtime import state_validation
from adapt_runtime.state_validation import check_factors, header_metadata

CHUNK, RANK = 4, 3


@pytest.fixture(scope="module")
def rt() -> ar.Runtime:
    return patched("hebbian", chunk_size=CHUNK, state_rank=RANK)


@pytest.fixture(scope="module")
def good(rt) -> bytes:
    state = rt.new_state()
    rt.forward(tokens(6 * CHUNK + 2), state)  # 6 writes (rank 3 after truncation) and a pending chunk
    assert state.writes == 6 and len(state.factors) == len(rt.config.layers)
    return state.to_bytes()


def forge(data: bytes, edit) -> bytes:
    tensors, meta = dict(st_load(data)), header_metadata(data)
    edit(tensors, meta)
    return st_save(tensors, metadata=meta)


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_save_load_gives_the_same_factors_and_the_same_next_turn(rule, tmp_path) -> None:
    rt = patched(rule, chunk_size=CHUNK, state_rank=RANK)
    state = rt.new_state()
    rt.forward(tokens(5 * CHUNK + 2), state)  # ends mid-chunk: pending rows are saved too
    path = tmp_path / "s.safetensors"
    state.save(path)
    loaded = ar.load_state(path, rt)
    assert set(loaded.factors) == set(state.factors) == set(rt.config.layers)
    for layer, (B, A) in state.factors.items():
        assert B.shape[1] == RANK
        assert torch.equal(loaded.factors[layer][0], B) and torch.equal(loaded.factors[layer][1], A)
    assert all(s is None for s in loaded.S.values())
    assert loaded.writes == state.writes and loaded.tokens == state.tokens and loaded.nbytes == state.nbytes
    nxt = tokens(3 * CHUNK, seed=4)  # the next turn completes the pending chunk and writes twice more
    assert torch.equal(rt.forward(nxt, loaded), rt.forward(nxt, state))
    assert loaded.writes == state.writes
    for layer, (B, A) in state.factors.items():
        assert torch.equal(loaded.factors[layer][0], B) and torch.equal(loaded.factors[layer][1], A)


def test_a_loaded_state_decodes_in_a_batch_as_alone(rt, good) -> None:
    """Loaded factors go through the slot pool's factor slabs like the runtime's own."""
    one, two = ar.state_from_bytes(good, rt), ar.state_from_bytes(good, rt)
    alone = ar.state_from_bytes(good, rt)
    nxt = tokens(2 * CHUNK, seed=5)
    batched = rt.forward(torch.stack([nxt, nxt]), [one, two])
    expected = rt.forward(nxt, alone)[0]
    assert_close(batched[0], expected, "logits")
    assert_close(batched[1], expected, "logits")


def test_the_rank_is_in_the_metadata_and_dense_files_are_unchanged(rt, good) -> None:
    assert header_metadata(good)["state_rank"] == str(RANK)
    assert set(k.split(".")[0] for k in st_load(good) if k[:2] in ("A.", "B.", "S.")) == {"A", "B"}
    dense = patched("hebbian", chunk_size=CHUNK)
    state = dense.new_state()
    dense.forward(tokens(9), state)
    assert "state_rank" not in header_metadata(state.to_bytes())


def test_a_fresh_state_round_trips_without_factors(rt) -> None:
    loaded = ar.state_from_bytes(rt.new_state().to_bytes(), rt)
    assert loaded.factors == {} and loaded.is_zero


def test_delta_norms_and_nbytes_count_the_factors(rt, good) -> None:
    state = ar.state_from_bytes(good, rt)
    for layer, (B, A) in state.factors.items():
        assert state.delta_norms()[layer] == pytest.approx(float(torch.linalg.vector_norm(B @ A)), rel=1e-5)
    factor_bytes = sum(4 * RANK * (d + f) for d, f in rt.state_spec.shapes)
    state.kv, state.last_logits, state.tokens = None, None, []
    state.pending.clear()
    assert state.nbytes == factor_bytes < sum(4 * d * f for d, f in rt.state_spec.shapes)


@pytest.mark.parametrize(("other", "data"), [
    pytest.param({"state_rank": RANK + 1}, "rank", id="rank-file-into-higher-rank"),
    pytest.param({}, "rank", id="rank-file-into-dense"),
    pytest.param({"state_rank": RANK}, "dense", id="dense-file-into-rank"),
])
def test_a_file_of_another_state_rank_is_incompatible(good, other, data) -> None:
    if data == "dense":
        dense = patched("hebbian", chunk_size=CHUNK)
        state = dense.new_state()
        dense.forward(tokens(9), state)
        good = state.to_bytes()
    runtime = patched("hebbian", chunk_size=CHUNK, **other)
    with pytest.raises(ar.IncompatibleStateError, match="state rank"):
        ar.state_from_bytes(good, runtime)


def _set(key, fn):
    def edit(t, m):
        t[key] = fn(t[key]).contiguous()
    return edit


def _nan(x):
    x = x.clone()
    x.view(-1)[-1] = float("nan")
    return x


def _wider(t, m):
    t["B.0"] = torch.cat([t["B.0"], t["B.0"][:, :1]], dim=1).contiguous()
    t["A.0"] = torch.cat([t["A.0"], t["A.0"][:1]], dim=0).contiguous()


def _large_product(t, m):
    """Each factor within the entry bound, but S = B A far above it."""
    t["B.1"] = torch.full_like(t["B.1"], 300.0)
    t["A.1"] = torch.full_like(t["A.1"], 400.0)


FORGED = {
    "nan-B": _set("B.0", _nan),
    "inf-A": _set("A.2", lambda a: a.masked_fill(torch.ones_like(a, dtype=torch.bool), float("inf"))),
    "huge-B": _set("B.0", lambda b: torch.full_like(b, 3e38)),
    "huge-A": _set("A.1", lambda a: a * 1e6),
    "S-above-bound": _large_product,
    "B-wrong-dtype": _set("B.0", lambda b: b.double()),
    "A-wrong-rows": _set("A.0", lambda a: a[:-1]),
    "B-wrong-d": _set("B.0", lambda b: b[:-1]),
    "A-wrong-f": _set("A.0", lambda a: a[:, :-1]),
    "B-1d": _set("B.0", lambda b: b[:, 0]),
    "rank-above-the-runtime": _wider,
    "rank-zero": lambda t, m: t.update({"B.0": t["B.0"][:, :0].contiguous(), "A.0": t["A.0"][:0].contiguous()}),
    "B-without-A": lambda t, m: t.pop("A.2"),
    "A-without-B": lambda t, m: t.pop("B.2"),
    "dense-S-in-a-rank-file": lambda t, m: t.update({"S.0": t["B.0"] @ t["A.0"]}),
    "factors-of-an-unknown-layer": lambda t, m: t.update({"B.7": t["B.0"].clone(), "A.7": t["A.0"].clone()}),
}


def test_the_unforged_factor_file_loads(rt, good) -> None:
    assert ar.state_from_bytes(forge(good, lambda t, m: None), rt).writes == 6


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_factors_are_refused(rt, good, case) -> None:
    with pytest.raises(ar.MalformedStateError):
        ar.state_from_bytes(forge(good, FORGED[case]), rt)


def test_factors_in_a_dense_runtimes_file_are_refused(good) -> None:
    dense = patched("hebbian", chunk_size=CHUNK)
    state = dense.new_state()
    dense.forward(tokens(9), state)
    tensors = dict(st_load(state.to_bytes()))
    tensors["B.0"], tensors["A.0"] = st_load(good)["B.0"], st_load(good)["A.0"]
    with pytest.raises(ar.MalformedStateError, match="dense S"):
        ar.state_from_bytes(st_save(tensors, metadata=header_metadata(state.to_bytes())), dense)


def test_the_s_bound_is_checked_on_the_product_only_where_the_row_norms_do_not_settle_it(rt) -> None:
    d, f = rt.state_spec.shapes[0]
    # rows of B of norm 7.1e4 and columns of A of norm 1.4: the Cauchy-Schwarz bound 1e5 does not settle it, the
    # product does (S = 0: the two components cancel), so the factors are accepted
    B = torch.full((d, 2), 5e4)
    A = torch.zeros(2, f)
    A[0], A[1] = 1.0, -1.0
    check_factors(B, A, 0, (d, f), RANK, rt)
    A[1] = -0.5  # now S = 2.5e4 everywhere: still inside
    check_factors(B, A, 0, (d, f), RANK, rt)
    A[1] = 1.5  # S = 1.25e5: above the bound of 1e5
    with pytest.raises(ar.MalformedStateError, match="S = B A"):
        check_factors(B, A, 0, (d, f), RANK, rt)


def test_the_product_is_checked_block_by_block_to_its_last_row(rt, monkeypatch) -> None:
    d, f = rt.state_spec.shapes[0]
    monkeypatch.setattr(state_validation, "PRODUCT_BLOCK", 2 * f)  # two rows of S at a time
    B = torch.full((d, 2), 5e4)
    B[-1, 1] = -9e4  # only the last row's S (5e4 + 9e4 = 1.4e5) is above the bound
    A = torch.zeros(2, f)
    A[0], A[1] = 1.0, -1.0
    with pytest.raises(ar.MalformedStateError, match="S = B A"):
        check_factors(B, A, 0, (d, f), RANK, rt)
    B[-1, 1] = -4e4
    check_factors(B, A, 0, (d, f), RANK, rt)


def test_forged_metadata_rank_is_incompatible(rt, good) -> None:
    for rank in ("2", "dense", ""):
        with pytest.raises(ar.IncompatibleStateError):
            ar.state_from_bytes(forge(good, lambda t, m, r=rank: m.update(state_rank=r)), rt)
    config = json.loads(header_metadata(good)["config"])
    assert config["state_rank"] == RANK
