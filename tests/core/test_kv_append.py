"""The KV cache appends in place (``adapt_runtime.kv_buffer``): decode steps over the same rows write only their new
positions into one buffer, the logits equal those of transformers' concatenating ``DynamicCache`` on the same
left-padded rows (also across buffer growths and with Gemma2's sliding layers), and a row's ``kv`` is a view of
exactly its own cached positions."""

from __future__ import annotations

import inspect

import pytest
import torch
from core_testing import DEVICE, VOCAB, assert_close, tiny_model, tokens
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import adapt_runtime as ar
from adapt_runtime import kv_buffer
from adapt_runtime.kv import assemble, scatter
from adapt_runtime.kv_buffer import AppendLayer, capacity_for


class Row:
    """The two fields of a state that ``assemble``/``scatter`` read and write."""

    def __init__(self) -> None:
        self.kv, self.kv_tokens = None, 0

    @property
    def kv_len(self) -> int:
        return self.kv_tokens if self.kv else 0


def call(model, ids, mask, positions, cache) -> torch.Tensor:
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{arg: cache}).logits


def appended(model, rows: list[Row], ids: torch.Tensor) -> torch.Tensor:
    """One call through ``assemble``/``scatter``, as the runtime makes it."""
    batched = assemble(rows, ids.shape[1], ids.device)
    logits = call(model, ids, batched.attention_mask, batched.position_ids, batched.cache)
    scatter(batched, rows)
    for r in rows:
        r.kv_tokens += ids.shape[1]
    return logits


def concatenated(model, padded, lengths: list[int], ids: torch.Tensor):
    """The reference: the rows' caches as left-padded tensors in transformers' own ``DynamicLayer`` (torch.cat)."""
    steps, width = ids.shape[1], max(lengths)
    cache = DynamicCache()
    for keys, values in padded:
        layer = DynamicLayer()
        layer.update(keys, values)
        cache.layers.append(layer)
    mask = None
    if len(set(lengths)) > 1:
        mask = torch.ones(len(lengths), width + steps, dtype=torch.long, device=ids.device)
        for b, n in enumerate(lengths):
            mask[b, : width - n] = 0
    positions = torch.tensor(lengths, device=ids.device)[:, None] + torch.arange(steps, device=ids.device)
    logits = call(model, ids, mask, positions, cache)
    return logits, [(layer.keys, layer.values) for layer in cache.layers]


def pad(rows_kv, lengths):
    """Rows' ``[1, H, n, D]`` caches, left-padded with zeros into ``[B, H, max n, D]`` per layer."""
    width, out = max(lengths), []
    for i in range(len(rows_kv[0])):
        k0, v0 = rows_kv[0][i]
        keys = k0.new_zeros(len(rows_kv), k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(len(rows_kv), v0.shape[1], width, v0.shape[3])
        for b, (kv, n) in enumerate(zip(rows_kv, lengths)):
            keys[b, :, width - n :], values[b, :, width - n :] = kv[i][0][0], kv[i][1][0]
        out.append((keys, values))
    return out


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_batched_steps_equal_the_concatenating_cache_across_growths(arch, monkeypatch):
    """Rows of lengths 9, 3 and 14 decoded together for 16 steps (one of 3 tokens), spare capacity cut to 2-3
    positions so that the buffer grows several times; Gemma2 with a window of 6, which the rows pass. The same
    positions meet the same kernels, so the logits are bitwise equal."""
    monkeypatch.setattr(kv_buffer, "SPARE_MIN", 2)
    monkeypatch.setattr(kv_buffer, "SPARE_MAX", 3)
    model = tiny_model(arch, **({"sliding_window": 6} if arch == "gemma2" else {}))
    prompts = [tokens(9, seed=1), tokens(3, seed=2), tokens(14, seed=3)]
    rows = [Row() for _ in prompts]
    alone = []
    for row, prompt in zip(rows, prompts):
        got = appended(model, [row], prompt[None])
        ref, kv = concatenated(model, [], [0], prompt[None])  # layers made by the cache as it needs them
        assert torch.equal(got, ref)
        alone.append(kv)
    lengths = [len(p) for p in prompts]
    padded = pad(alone, lengths)
    buffers = []
    for step in range(16):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(3, VOCAB, (3, 3 if step == 5 else 1), generator=gen).to(DEVICE)
        got = appended(model, rows, ids)
        ref, padded = concatenated(model, padded, lengths, ids)
        assert torch.equal(got, ref), f"step {step}"
        lengths = [n + ids.shape[1] for n in lengths]
        for row, n in zip(rows, lengths):
            assert row.kv_len == n and all(k.shape[-2] == v.shape[-2] == n for k, v in row.kv)
        buffers.append(storage(rows[0].kv[0][0]))
    grown = sum(a != b for a, b in zip(buffers, buffers[1:]))
    assert 2 <= grown < len(buffers) - 1  # it grew, and most steps wrote in place


@pytest.mark.parametrize("rule", ["none", "hebbian"])
def test_decode_steps_over_the_same_rows_keep_one_buffer(rule):
    rt = ar.patch(tiny_model("llama"), rule=rule, chunk_size=4, lr=2.0)
    states = [rt.new_state() for _ in range(3)]
    for s, n in zip(states, [5, 11, 2]):
        rt.forward(tokens(n, seed=n), s)
    steps = torch.stack([tokens(12, seed=20 + b) for b in range(3)])
    rt.forward(steps[:, :1], states)  # rows from three calls: copied into one new buffer
    first = [[storage(k) for k, _ in s.kv] for s in states]
    assert all(row == first[0] for row in first)  # one buffer per layer, shared by the rows
    for t in range(1, steps.shape[1]):
        rt.forward(steps[:, t : t + 1], states)
        assert [[storage(k) for k, _ in s.kv] for s in states] == first, f"step {t} reallocated"
        for s in states:
            assert all(k.shape == v.shape and k.shape[0] == 1 and k.shape[-2] == s.kv_len for k, v in s.kv)
    if rule == "hebbian":
        assert all(s.writes > 0 for s in states)


def test_a_row_view_holds_only_its_own_positions():
    """Views never show the spare positions or another row; a clone, the saved file and ``nbytes`` hold only the
    row's filled part; a row decoded alone afterwards continues its row of the buffer and leaves the others' views
    as they were."""
    rt = ar.patch(tiny_model("llama"), rule="hebbian", chunk_size=4, lr=2.0)
    states = [rt.new_state() for _ in range(2)]
    rt.forward(tokens(3, seed=1), states[0])
    rt.forward(tokens(7, seed=2), states[1])
    for t in range(3):
        rt.forward(tokens(2, seed=10 + t)[:, None], states)
    short, long = states
    k, v = short.kv[0]
    assert k.shape[-2] == short.kv_len == 6 and long.kv[0][0].shape[-2] == long.kv_len == 10
    assert k.untyped_storage().nbytes() > k.numel() * k.element_size()  # a view into the shared buffer
    copy = short.clone()
    ck, _ = copy.kv[0]
    assert torch.equal(ck, k) and ck.untyped_storage().nbytes() == ck.numel() * ck.element_size()
    assert short.nbytes == copy.nbytes  # counts the row's positions, as the compact copy holds them
    loaded = ar.state_from_bytes(_save(short), rt)
    assert all(torch.equal(a, b) and a.shape == b.shape for pa, pb in zip(loaded.kv, short.kv)
               for a, b in zip(pa, pb))
    before_long = [(a.clone(), b.clone()) for a, b in long.kv]
    reference = short.clone()  # cloned views are not in a buffer: this row is copied, the original continues
    ids = tokens(4, seed=30)
    got = rt.forward(ids, short)
    assert storage(short.kv[0][0]) == storage(long.kv[0][0])  # appended in place into its row of the buffer
    assert torch.equal(got, rt.forward(ids, reference))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(long.kv, before_long))
    twins = [s.clone() for s in states]  # not in a buffer: copied into a new one
    ids = tokens(2, seed=40)[:, None]
    assert torch.equal(rt.forward(ids, states), rt.forward(ids, twins))  # the rows no longer end together
    assert [k.shape[-2] for k, _ in long.kv[:1] + short.kv[:1]] == [11, 11]


def _save(state) -> bytes:
    from adapt_runtime.state_file import state_to_bytes

    return state_to_bytes(state)


def test_a_buffer_made_in_inference_mode_is_copied_outside_it():
    rt = ar.patch(tiny_model("llama"), rule="none")
    states = [rt.new_state() for _ in range(2)]
    with torch.inference_mode():
        rt.forward(torch.stack([tokens(5, seed=1), tokens(5, seed=2)]), states)
    twins = [s.clone() for s in states]
    for t in range(3):  # outside inference mode the inference-tensor buffer cannot be written: a copy
        ids = tokens(2, seed=t)[:, None]
        assert torch.equal(rt.forward(ids, states), rt.forward(ids, twins))


def test_under_autograd_the_layer_concatenates_and_keeps_no_buffer():
    keys, values = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    layer = AppendLayer.holding(keys, values)
    new = torch.randn(1, 2, 1, 8, requires_grad=True)
    with torch.enable_grad():
        k, v = layer.update(new, new * 2)
    assert k.grad_fn is not None and layer.buffer is None and torch.equal(k[:, :, :4], keys)
    (k_view, _), = layer.row_views([0])
    assert k_view.grad_fn is None and k_view.shape[-2] == 5


def test_spare_capacity_is_bounded():
    for n in [0, 1, 10, 64, 127, 128, 1000, 1024, 5000]:
        spare = capacity_for(n) - n
        assert kv_buffer.SPARE_MIN <= spare <= kv_buffer.SPARE_MAX
        assert spare <= max(kv_buffer.SPARE_MIN, n // 2)


@pytest.mark.parametrize("rule", ["none", "hebbian"])
@pytest.mark.parametrize("subset", [[1, 2], [0, 2], [2, 1]], ids=["rows-1-2", "rows-0-2", "rows-2-1"])
def test_a_subset_of_a_batch_continues_its_own_rows(rule, subset):
    """Three rows (9, 3 and 6 tokens) decoded together share one buffer; a later call over only some of them, in
    any order, must continue each row's own cache: its logits equal each row's copy continued alone."""
    rt = ar.patch(tiny_model("llama"), rule=rule, chunk_size=4, lr=2.0)
    states = [rt.new_state() for _ in range(3)]
    for s, n in zip(states, [9, 3, 6]):
        rt.forward(tokens(n, seed=n), s)
    for t in range(3):
        rt.forward(torch.stack([tokens(3, seed=40 + b)[t : t + 1] for b in range(3)]), states)
    shared = {storage(s.kv[0][0]) for s in states}
    assert len(shared) == 1  # the three rows are rows of one buffer
    chosen = [states[i] for i in subset]
    alone = [s.clone() for s in chosen]  # not in a buffer: each continues in a copy of its own
    steps = torch.stack([tokens(5, seed=50 + i) for i in subset])
    for t in range(steps.shape[1]):
        got = rt.forward(steps[:, t : t + 1], chosen)
        for b, s in enumerate(alone):
            assert_close(got[b : b + 1], rt.forward(steps[b : b + 1, t : t + 1], s), "logits")
        if subset == [1, 2] and t == 0:  # consecutive rows ending where the buffer is filled: continued in place
            assert {storage(s.kv[0][0]) for s in chosen} == shared
    for s, a in zip(chosen, alone):
        assert s.kv_len == a.kv_len
        for (k, v), (ka, va) in zip(s.kv, a.kv):
            assert_close(k, ka, "state")
            assert_close(v, va, "state")
