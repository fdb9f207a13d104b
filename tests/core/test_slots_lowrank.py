"""The slot pool for a low-rank runtime: factor slabs that copy a row's factors only when they changed."""

from __future__ import annotations

import gc

import pytest
import torch
from core_testing import assert_close, patched, tokens

from adapt_runtime import lowrank

RANK = 3


def _states_with_factors(rt, n: int, steps: int = 9):
    """``n`` states whose layers hold factors of rank 1..RANK (chunk 4: two or more writes each)."""
    states = [rt.new_state() for _ in range(n)]
    for i, s in enumerate(states):
        rt.forward(tokens(steps + i, seed=i), s)
    return states


def _padded(factors, rank: int):
    B, A = factors
    return (torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1),
            torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], dim=0))


@pytest.mark.parametrize("order", ["consecutive", "shuffled"])
def test_apply_slots_equals_the_per_row_product(order) -> None:
    torch.manual_seed(0)
    d, f, n = 6, 10, 4
    per_row = [(torch.randn(d, k), torch.randn(k, f)) for k in (1, 3, 2, 3)]
    B_slab, A_slab = torch.zeros(n + 2, d, RANK), torch.zeros(n + 2, RANK, f)
    slots = torch.tensor([1, 2, 3, 4] if order == "consecutive" else [4, 1, 5, 2])
    for k, factors in zip(slots.tolist(), per_row):
        B_slab[k], A_slab[k] = _padded(factors, RANK)
    x, y = torch.randn(n, 5, f), torch.randn(n, 5, d)
    got = lowrank.apply_slots(y, x, B_slab, A_slab, slots)
    assert_close(got, lowrank.apply_rows(y, x, per_row), "definition")


def test_bind_factors_copies_changed_factors_only() -> None:
    rt = patched("hebbian", chunk_size=4, state_rank=RANK)
    pool, layers = rt.slot_pool, list(rt.config.layers)
    states = _states_with_factors(rt, 2)
    slots = pool.bind_factors(states, layers, RANK).tolist()
    layer = layers[0]
    B_slab, A_slab = pool.factor_slabs[layer]
    for s, k in zip(states, slots):
        B, A = _padded(s.factors[layer], RANK)
        assert torch.equal(B_slab[k], B) and torch.equal(A_slab[k], A)
    B_slab[slots[0]].fill_(7.0)  # a mark: an unchanged row is not copied again, so the mark stays
    pool.bind_factors(states, layers, RANK)
    assert bool((B_slab[slots[0]] == 7.0).all())
    rt.forward(tokens(4, seed=9), states[0])  # a chunk write: new factors, copied on the next bind
    pool.bind_factors(states, layers, RANK)
    assert torch.equal(B_slab[slots[0]], _padded(states[0].factors[layer], RANK)[0])


def test_a_row_without_factors_reads_zeros_from_a_reused_slot() -> None:
    rt = patched("hebbian", chunk_size=4, state_rank=RANK)
    pool, layers = rt.slot_pool, list(rt.config.layers)
    states = _states_with_factors(rt, 2)
    pool.bind_factors(states, layers, RANK)
    del states
    gc.collect()
    fresh = [rt.new_state(), rt.new_state()]  # takes the dead rows' slots, which still hold their factors
    for k in pool.bind_factors(fresh, layers, RANK).tolist():
        for layer in layers:
            assert not pool.factor_slabs[layer][0][k].any() and not pool.factor_slabs[layer][1][k].any()


def test_growing_and_trimming_keep_each_rows_factors() -> None:
    rt = patched("hebbian", chunk_size=4, state_rank=RANK)
    pool, layers = rt.slot_pool, list(rt.config.layers)
    first = _states_with_factors(rt, 3)
    pool.bind_factors(first, layers, RANK)
    more = _states_with_factors(rt, 2, steps=6)
    pool.bind_factors(first[:1] + more, layers, RANK)  # grows: the first rows keep their slots and values
    del first[1:]
    gc.collect()
    pool.bind_factors(first + more + [rt.new_state()], layers, RANK)  # most slots free: trimmed first
    for s in first + more:
        k = pool.slot_of(s)
        for layer in layers:
            B, A = _padded(s.factors[layer], RANK)
            assert torch.equal(pool.factor_slabs[layer][0][k], B) and torch.equal(pool.factor_slabs[layer][1][k], A)


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_batched_low_rank_rows_in_slots_equal_the_per_row_path(rule) -> None:
    rt = patched(rule, chunk_size=4, state_rank=RANK)
    pooled = _states_with_factors(rt, 3)
    looped = [s.clone() for s in pooled]
    ids = torch.stack([tokens(9, seed=20 + i) for i in range(3)])
    got = torch.cat([rt.forward(ids[:, t : t + 1], pooled) for t in range(9)], dim=1)
    assert all(rt.slot_pool.slot_of(s) is not None for s in pooled)
    rt.slot_pool = None  # every row applies its own factors (lowrank.apply_rows)
    expected = torch.cat([rt.forward(ids[:, t : t + 1], looped) for t in range(9)], dim=1)
    assert_close(got, expected, "logits")
    for a, b in zip(pooled, looped):
        assert a.writes == b.writes
        for layer in rt.config.layers:
            assert_close(lowrank.dense(a.factors[layer], (1, 1)), lowrank.dense(b.factors[layer], (1, 1)), "state")
