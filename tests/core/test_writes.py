"""The write path: every rule's write goes through ``kernels.write``, and a write is applied to every plastic
layer or to none (a refused write leaves S, the counters and the log consistent)."""

from __future__ import annotations

import logging

import pytest
import torch
from core_testing import DEVICE, patched, tiny_model, tokens

import adapt_runtime as ar
from adapt_runtime import kernels
from adapt_runtime.rules import InPlaceTTTRule, Write


def ttt_rule(model) -> InPlaceTTTRule:
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(5)
    conv = {i: (0.3 * torch.randn(d, 1, 5, generator=g)).to(DEVICE) for i in range(3)}
    proj = {i: (0.2 * torch.randn(d, d, generator=g)).to(DEVICE) for i in range(3)}
    return InPlaceTTTRule(conv=conv, proj=proj, ttt_layers=[0, 1, 2], ttt_chunk=4, ttt_lr=0.5)


def runtime(rule: str) -> ar.Runtime:
    if rule == "inplace-ttt":
        model = tiny_model()
        return ar.patch(model, rule=ttt_rule(model))
    return patched(rule, chunk_size=4)


@pytest.mark.parametrize("rule", ["hebbian", "hebbian-output", "gradient", "inplace-ttt"])
def test_every_rule_writes_only_through_kernels_write(rule, monkeypatch):
    """Every write goes through ``kernels.write`` (or ``kernels.chunk_scan``, the one-pass prefill's apply and
    writes of a span)."""
    rt = runtime(rule)
    calls = []

    def recording_no_op(S, slots, V, X, beta=None, decay=1.0, max_norm=None, **kw):
        calls.append((S.shape, V.shape, X.shape))
        return torch.zeros(slots.numel(), device=S.device)

    def scan_no_op(y, x, S, slot, offsets, V, X, write_offsets, *args, **kw):  # the one-pass path's writes
        writes = write_offsets.numel() - 1
        calls.extend([(S.shape, V.shape, X.shape)] * writes)
        return torch.zeros(writes, device=S.device)

    monkeypatch.setattr(kernels, "write", recording_no_op)
    monkeypatch.setattr(kernels, "chunk_scan", scan_no_op)
    state = rt.new_state()
    rt.forward(tokens(13), state)  # chunks 0, 1, 2 complete and labelled
    assert state.writes == 3 and len(calls) == 3 * len(rt.config.layers)
    # the writes did nothing, so nothing else may have changed S
    assert all(S is None or not S.any() for S in state.S.values())


def overflowing(rule, layer: int):
    """Wrap ``rule.write`` so that ``layer``'s write has finite inputs whose product overflows float32."""
    write = rule.write

    def wrapped(*args, **kwargs):
        writes = write(*args, **kwargs)
        return [Write(w.layer, w.V * 1e20, w.X * 1e20, w.beta) if w.layer == layer else w for w in writes]

    return wrapped


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
@pytest.mark.parametrize("bad_layer", [0, 2], ids=lambda i: f"layer{i}")
def test_a_write_refused_on_one_layer_writes_no_layer(rule, bad_layer, monkeypatch, caplog):
    rt = ar.patch(tiny_model(), rule=rule, chunk_size=4, lr=2.0, decay=0.5)
    state = rt.new_state()
    rt.forward(tokens(5), state)  # one good write: S is non-zero, so a decayed layer would show
    assert state.writes == 1
    before = {i: S.clone() for i, S in state.S.items()}
    monkeypatch.setattr(rt.rule, "write", overflowing(rt.rule, bad_layer))
    with caplog.at_level(logging.WARNING, logger="adapt_runtime"):
        rt.forward(tokens(4, seed=1), state)  # completes chunk 1: its write overflows on one layer
    assert state.writes == 1 and state.refused_writes == 1
    for i, S in state.S.items():
        assert torch.equal(S, before[i]), f"layer {i} changed by a refused write"
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.undo()
    rt.forward(tokens(4, seed=2), state)  # the next write goes through again
    assert state.writes == 2 and state.refused_writes == 1


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_non_finite_write_writes_no_layer(poison, monkeypatch):
    rt = patched("hebbian", chunk_size=4)
    write = rt.rule.write

    def bad(*args, **kwargs):
        writes = write(*args, **kwargs)
        V = writes[-1].V.clone()
        V[0, 0] = float(poison)
        return [*writes[:-1], Write(writes[-1].layer, V, writes[-1].X, writes[-1].beta)]

    monkeypatch.setattr(rt.rule, "write", bad)
    state = rt.new_state()
    rt.forward(tokens(9), state)
    assert state.writes == 0 and state.refused_writes == 2 and state.is_zero
