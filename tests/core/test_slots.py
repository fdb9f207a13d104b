"""The slot pool: batched rows keep their fast weights in slot storage, with the same results as stacking them."""

from __future__ import annotations

import gc

import pytest
import torch
from core_testing import patched, tokens

import adapt_runtime as ar
from adapt_runtime.slots import SlotPool


def _prefill(rt: ar.Runtime, n: int) -> list[ar.FastWeights]:
    states = [rt.new_state() for _ in range(n)]
    rt.forward(torch.stack([tokens(10, seed=i) for i in range(n)]), states)
    return states


def _decode(rt: ar.Runtime, states: list[ar.FastWeights], steps: int, seed: int = 50) -> torch.Tensor:
    ids = torch.stack([tokens(steps, seed=seed + i) for i in range(len(states))])
    return torch.cat([rt.forward(ids[:, t : t + 1], states) for t in range(steps)], dim=1)


def _shares(t: torch.Tensor, slab: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_pool_equals_stacking_bit_for_bit(rule):
    rt = patched(rule, chunk_size=4)
    pooled = _prefill(rt, 3)
    stacked = [s.clone() for s in pooled]
    got = _decode(rt, pooled, 9)
    pool, rt.slot_pool = rt.slot_pool, None
    expected = _decode(rt, stacked, 9)
    assert pool.capacity == 3
    assert torch.equal(got, expected)
    for a, b in zip(pooled, stacked):
        assert a.writes == b.writes > 0
        for layer in rt.config.layers:
            assert torch.equal(a.S[layer], b.S[layer])


def test_resident_rows_write_in_place_and_are_not_restacked():
    rt = patched("hebbian", chunk_size=4)
    states = _prefill(rt, 2)
    layer = rt.config.layers[0]
    slab = rt.slot_pool.slabs[layer]
    views = [s.S[layer] for s in states]
    for s in states:
        assert _shares(s.S[layer], slab)
    before = [v.clone() for v in views]
    _decode(rt, states, 8)  # two chunk writes per row
    assert rt.slot_pool.slabs[layer] is slab  # same storage, no new stack
    for s, v, b in zip(states, views, before):
        assert s.S[layer] is v and not torch.equal(v, b)  # written in place
        assert torch.equal(slab[rt.slot_pool.slot_of(s)], s.S[layer])


def test_evict_round_trips_bit_for_bit():
    rt = patched("hebbian", chunk_size=4)
    states = _prefill(rt, 2)
    _decode(rt, states, 5)
    copies = [s.clone() for s in states]
    for s in states:
        rt.slot_pool.evict(s)
    slab = rt.slot_pool.slabs[rt.config.layers[0]]
    for s, c in zip(states, copies):
        assert rt.slot_pool.slot_of(s) is None
        for layer in rt.config.layers:
            assert torch.equal(s.S[layer], c.S[layer]) and not _shares(s.S[layer], slab)
    got = _decode(rt, states, 6)  # bound again
    rt.slot_pool = None
    assert torch.equal(got, _decode(rt, copies, 6))


def test_bound_state_saves_loads_and_forks_like_a_detached_one(tmp_path):
    rt = patched("hebbian", chunk_size=4)
    states = _prefill(rt, 2)
    _decode(rt, states, 5)
    fork = states[0].clone()
    states[0].save(tmp_path / "s.safetensors")
    loaded = ar.load_state(tmp_path / "s.safetensors", rt)
    slab = rt.slot_pool.slabs[rt.config.layers[0]]
    for layer in rt.config.layers:
        assert torch.equal(loaded.S[layer], states[0].S[layer]) and torch.equal(fork.S[layer], states[0].S[layer])
        assert not _shares(fork.S[layer], slab)
    rt.forward(tokens(3, seed=9).repeat(2, 1), states)  # the original moves on
    assert torch.equal(loaded.S[rt.config.layers[0]], fork.S[rt.config.layers[0]])  # the copies do not


def test_replaced_or_reset_state_is_reloaded():
    rt = patched("hebbian", chunk_size=4)
    states = _prefill(rt, 2)
    _decode(rt, states, 5)
    stacked = [s.clone() for s in states]
    states[1].reset()
    stacked[1].reset()
    layer = rt.config.layers[0]
    states[0].S[layer] = states[0].S[layer] * 2  # a new tensor: copied into the slot on the next bind
    stacked[0].S[layer] = stacked[0].S[layer] * 2
    got = _decode(rt, states, 6)
    rt.slot_pool = None
    assert torch.equal(got, _decode(rt, stacked, 6))


def test_dead_states_free_their_slots():
    rt = patched("hebbian", chunk_size=4)
    states = _prefill(rt, 3)
    _decode(rt, states, 5)
    del states
    gc.collect()
    _decode(rt, _prefill(rt, 3), 5)
    assert rt.slot_pool.capacity == 3


def test_max_slots_evicts_least_recently_bound_and_matches_stacking():
    rt = patched("hebbian", chunk_size=4)
    rt.slot_pool = SlotPool(rt.state_spec, max_slots=2)
    states = _prefill(rt, 2) + _prefill(rt, 2)
    stacked = [s.clone() for s in states]
    got = [_decode(rt, states[:2], 5), _decode(rt, states[2:], 5), _decode(rt, states[1:3], 5)]
    assert rt.slot_pool.capacity == 2 and rt.slot_pool.slot_of(states[0]) is None
    rt.slot_pool = None
    expected = [_decode(rt, stacked[:2], 5), _decode(rt, stacked[2:], 5), _decode(rt, stacked[1:3], 5)]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    with pytest.raises(ValueError, match="max_slots"):
        SlotPool(rt.state_spec, max_slots=0)


def test_rows_past_max_slots_fall_back_to_stacking():
    rt = patched("hebbian", chunk_size=4)
    rt.slot_pool = SlotPool(rt.state_spec, max_slots=1)
    states = _prefill(rt, 2)
    stacked = [s.clone() for s in states]
    got = _decode(rt, states, 5)
    assert rt.slot_pool.capacity == 0
    rt.slot_pool = None
    assert torch.equal(got, _decode(rt, stacked, 5))


def test_growing_the_pool_moves_bound_rows_with_their_values():
    rt = patched("hebbian", chunk_size=4)
    first = _prefill(rt, 2)
    _decode(rt, first, 5)
    values = [s.clone() for s in first]
    more = _prefill(rt, 2)  # two more rows while the first two are bound: the pool grows to 4 slots
    rt.forward(tokens(4, seed=7).repeat(2, 1), more)
    # the bound rows moved into the new slabs with their values, and all four decode together without growing
    rt.forward(tokens(1, seed=8).repeat(4, 1), first + more, adapt=False)
    assert rt.slot_pool.capacity == 4
    slab = rt.slot_pool.slabs[rt.config.layers[0]]
    for s, v in zip(first, values):
        for layer in rt.config.layers:
            assert _shares(s.S[layer], rt.slot_pool.slabs[layer]) and torch.equal(s.S[layer], v.S[layer])
    assert slab.shape[0] == 4


def test_pool_gives_back_the_slots_of_dropped_sessions():
    rt = patched("hebbian", chunk_size=4)
    states = _prefill(rt, 5)
    _decode(rt, states, 5)
    keep = states[:1] + [rt.new_state()]
    values = keep[0].clone()
    del states
    gc.collect()
    got = rt.forward(tokens(1, seed=3).repeat(2, 1), keep, adapt=False)
    assert rt.slot_pool.capacity == 2  # 4 of 5 slots were free: trimmed to the live row, then one new slot
    for layer in rt.config.layers:
        assert _shares(keep[0].S[layer], rt.slot_pool.slabs[layer]) and torch.equal(keep[0].S[layer], values.S[layer])
    rt.slot_pool = None
    assert torch.equal(got, rt.forward(tokens(1, seed=3).repeat(2, 1), [values, rt.new_state()], adapt=False))


def test_a_fresh_row_reads_zeros_from_a_slot_a_dropped_session_left():
    """A dead session's slot still holds its fast weights; a fresh row that takes it must read S = 0 there (the
    slot is zeroed), so its logits equal those of a fresh state decoded without a pool."""
    rt = patched("hebbian", chunk_size=4)
    states = _prefill(rt, 3)
    _decode(rt, states, 5)
    pool = rt.slot_pool
    dead_slots = [pool.slot_of(s) for s in states[1:]]
    assert all(s.S[layer].abs().sum() > 0 for s in states[1:] for layer in rt.config.layers)  # nonzero S
    keep = states[:1]
    values = keep[0].clone()
    del states
    gc.collect()
    fresh = [rt.new_state(), rt.new_state()]
    ids = torch.stack([tokens(6, seed=60 + i) for i in range(3)])
    got = torch.cat([rt.forward(ids[:, t : t + 1], keep + fresh) for t in range(6)], dim=1)
    assert sorted(pool.slot_of(s) for s in fresh) == sorted(dead_slots)  # the dead sessions' slots were reused
    rt.slot_pool = None
    stacked = [values, rt.new_state(), rt.new_state()]
    expected = torch.cat([rt.forward(ids[:, t : t + 1], stacked) for t in range(6)], dim=1)
    assert torch.equal(got, expected)
    for a, b in zip(fresh, stacked[1:]):
        for layer in rt.config.layers:
            assert (a.S[layer] is None) == (b.S[layer] is None)
            if a.S[layer] is not None:
                assert torch.equal(a.S[layer], b.S[layer])


def test_trimming_moves_a_kept_session_from_a_high_slot_to_its_new_index():
    """The kept session sits in slot 3 of 5; after the trim the pool has 2 slots, so its slot index must change
    and point at the slab row holding its S (values unchanged, logits equal to stacking)."""
    rt = patched("hebbian", chunk_size=4)
    states = _prefill(rt, 5)
    _decode(rt, states, 5)
    keep = [states[3]]
    assert rt.slot_pool.slot_of(keep[0]) == 3
    values = keep[0].clone()
    del states
    gc.collect()
    keep.append(rt.new_state())
    ids = torch.stack([tokens(6, seed=70 + i) for i in range(2)])
    got = [rt.forward(ids[:, :1], keep, adapt=False)]
    pool = rt.slot_pool
    assert pool.capacity == 2  # 4 of 5 slots were free: trimmed to the live row, then one new slot
    k = pool.slot_of(keep[0])
    assert k is not None and 0 <= k < pool.capacity and k != pool.slot_of(keep[1])
    for layer in rt.config.layers:
        assert torch.equal(keep[0].S[layer], values.S[layer])
        assert torch.equal(pool.slabs[layer][k], values.S[layer])  # its slot index points at its own row
        assert _shares(keep[0].S[layer], pool.slabs[layer])
    got += [rt.forward(ids[:, t : t + 1], keep) for t in range(1, 6)]  # decoding (and writing) goes on in the slot
    for layer in rt.config.layers:
        assert torch.equal(pool.slabs[layer][pool.slot_of(keep[0])], keep[0].S[layer])
    rt.slot_pool = None
    stacked = [values, rt.new_state()]
    expected = [rt.forward(ids[:, :1], stacked, adapt=False)]
    expected += [rt.forward(ids[:, t : t + 1], stacked) for t in range(1, 6)]
    assert torch.equal(torch.cat(got, dim=1), torch.cat(expected, dim=1))
