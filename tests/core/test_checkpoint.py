"""A turn's checkpoint: the state is changed in place and put back bit for bit; only a write copies, and only once.

``adapt_runtime.checkpoint``: taking a checkpoint copies no tensor; S and the rule's extra tensors are copied on
their first in-place change of the turn (copy-on-first-write), the KV cache is never copied (a buffer's positions
are written once, so the committed views stay as they were).
"""

from __future__ import annotations

import pytest
import torch
from core_testing import patched, tokens

import adapt_runtime as ar
from adapt_runtime.checkpoint import Checkpoint
from adapt_runtime.slots import SlotPool


def snapshot(s: ar.FastWeights) -> dict:
    """Everything a state carries, by value (the tensors cloned)."""
    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().clone()

    return {
        "S": {k: c(t) for k, t in s.S.items()},
        "factors": {k: (c(b), c(a)) for k, (b, a) in s.factors.items()},
        "extra": {n: {k: c(t) for k, t in part.items()} for n, part in s.extra.items()},
        "kv": None if s.kv is None else [(c(k), c(v)) for k, v in s.kv],
        "pending": (s.pending.chunk, list(s.pending.positions), {n: c(t) for n, t in s.pending.tensors().items()}),
        "tokens": (list(s.tokens), s.tokens_offset), "last_logits": c(s.last_logits),
        "counters": (s.writes, s.refused_writes, s.kv_tokens, s.kv_len, s.tokens_seen, s.version),
    }


def assert_same(a: object, b: object, where: str = "state") -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} vs {b.keys()}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def storages(s: ar.FastWeights) -> dict[str, int]:
    """The data pointer of each S and KV tensor's storage."""
    ptrs = {f"S.{k}": t.untyped_storage().data_ptr() for k, t in s.S.items() if t is not None}
    for i, (k, v) in enumerate(s.kv or []):
        ptrs[f"K.{i}"], ptrs[f"V.{i}"] = k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()
    return ptrs


def s_bytes(s: ar.FastWeights) -> int:
    return sum(t.numel() * t.element_size() for t in s.S.values() if t is not None)


RULES = [pytest.param("hebbian", {}, id="hebbian"), pytest.param("gradient", {}, id="gradient"),
         pytest.param("gradient", {"momentum": 0.5, "fast_decay": 0.7, "consolidate": 0.2}, id="gradient-extras"),
         pytest.param("hebbian", {"norm_bound": 1e-4}, id="hebbian-norm-bound"),
         pytest.param("hebbian", {"state_rank": 4}, id="hebbian-low-rank")]


@pytest.mark.parametrize("rule,options", RULES)
def test_restore_puts_every_part_of_the_state_back_bit_for_bit(rule, options):
    rt = patched(rule, chunk_size=4, **options)
    state = rt.new_state()
    rt.forward(tokens(10, seed=1), state)  # committed: written chunks, a pending chunk, KV, logits
    before = snapshot(state)
    checkpoint = Checkpoint(state)
    rt.forward(tokens(9, seed=2), state)  # a prompt: chunks written, KV appended
    for t in tokens(6, seed=3):
        rt.forward(t[None], state)  # decode steps
    state.drop_kv()
    rt.forward(tokens(5, seed=4), state, adapt=False)
    assert state.writes > before["counters"][0], "the turn wrote nothing: the test would not see a lost write"
    checkpoint.restore()
    assert state.checkpoint is None
    assert_same(snapshot(state), before)
    again = rt.new_state()  # and it goes on exactly as a state that never took the turn
    rt.forward(tokens(10, seed=1), again)
    assert torch.equal(rt.forward(tokens(6, seed=5), state), rt.forward(tokens(6, seed=5), again))


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_a_turn_without_a_write_copies_nothing_and_stays_in_the_same_storage(rule):
    rt = patched(rule, chunk_size=16)
    state = rt.new_state()
    rt.forward(tokens(20, seed=1), state)  # one chunk written, 4 positions pending
    ptrs = storages(state)
    checkpoint = Checkpoint(state)
    for t in tokens(5, seed=2):  # stays inside chunk 1: no write
        rt.forward(t[None], state)
    assert state.writes == 1
    assert checkpoint.copied_bytes == 0
    checkpoint.release()  # the commit
    assert storages(state) == ptrs, "S or the KV moved: the turn copied it"


def test_a_writing_turn_copies_each_layer_once_on_its_first_write():
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    rt.forward(tokens(6, seed=1), state)
    committed = snapshot(state)
    checkpoint = Checkpoint(state)
    kv_ptrs = {k: p for k, p in storages(state).items() if not k.startswith("S.")}
    writes = []
    for t in tokens(12, seed=2):  # decode steps through three chunk writes
        rt.forward(t[None], state)
        writes.append((state.writes, checkpoint.copied_bytes))
    assert state.writes - committed["counters"][0] == 3
    assert checkpoint.copied_bytes == s_bytes(state), "not exactly one copy of each written layer's S"
    assert len({b for w, b in writes if w > committed["counters"][0]}) == 1, "a later write copied again"
    assert {k: p for k, p in storages(state).items() if not k.startswith("S.")} == kv_ptrs
    checkpoint.restore()
    assert_same(snapshot(state), committed)


def test_a_slot_bound_state_rolls_back_though_its_slot_was_written_in_place():
    """Rows decoded together write S in place into their slots; the checkpoint keeps the committed rows."""
    rt = patched("hebbian", chunk_size=4)
    states = [rt.new_state() for _ in range(3)]
    rt.forward(torch.stack([tokens(10, seed=i) for i in range(3)]), states)
    layer = rt.config.layers[0]
    assert rt.slot_pool.slot_of(states[0]) is not None
    before = [snapshot(s) for s in states]
    checkpoints = [Checkpoint(s) for s in states[:2]]
    for step in range(8):  # two chunk writes per row, in the slots
        rt.forward(torch.stack([tokens(1, seed=20 + 3 * step + i) for i in range(3)]), states)
    assert rt.slot_pool.bound() == 3, "a turn took a second slot"
    assert not torch.equal(states[2].S[layer], before[2]["S"][layer])
    for checkpoint in checkpoints:
        checkpoint.restore()
    for s, b in zip(states[:2], before[:2]):
        assert_same(snapshot(s), b)
    rt.forward(torch.stack([tokens(1, seed=99 + i) for i in range(3)]), states)  # and batch again from there
    assert rt.slot_pool.bound() == 3


def test_an_evicted_slot_does_not_take_the_committed_rows_with_it():
    rt = patched("hebbian", chunk_size=4)
    rt.slot_pool = SlotPool(rt.state_spec, max_slots=2)
    states = [rt.new_state() for _ in range(2)]
    rt.forward(torch.stack([tokens(10, seed=i) for i in range(2)]), states)
    before = snapshot(states[0])
    checkpoint = Checkpoint(states[0])
    others = [rt.new_state() for _ in range(2)]
    rt.forward(torch.stack([tokens(10, seed=7 + i) for i in range(2)]), others)  # both slots go to the others
    assert rt.slot_pool.slot_of(states[0]) is None
    rt.forward(torch.stack([tokens(4, seed=9 + i) for i in range(2)]), others)  # and are written there
    checkpoint.restore()
    assert_same(snapshot(states[0]), before)


def test_one_checkpoint_at_a_time():
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    Checkpoint(state)
    with pytest.raises(RuntimeError, match="open checkpoint"):
        Checkpoint(state)
