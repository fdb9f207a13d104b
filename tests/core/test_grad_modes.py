"""The gradient rule under ``torch.no_grad()`` and ``torch.inference_mode()``: users call the runtime that way, and
the writes (which need autograd inside the runtime) must be the same as without."""

from __future__ import annotations

import contextlib

import pytest
import torch
from core_testing import assert_close, patched, tokens

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def feed(rt, ids, cuts, mode=None):
    """Feed ``ids`` cut at ``cuts`` under ``mode`` (a context manager factory, or None); logits and state."""
    state = rt.new_state()
    with mode() if mode is not None else contextlib.nullcontext():
        out = torch.cat([rt.forward(ids[a:b], state) for a, b in zip(cuts, cuts[1:])], dim=1)
    return out, state


@pytest.mark.parametrize("feed_as", ["one-call", "pieces", "token-by-token"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_gradient_rule_under_grad_free_modes(mode, feed_as):
    rt = patched("gradient", chunk_size=4)
    ids = tokens(13)
    cuts = {"one-call": [0, 13], "pieces": [0, 3, 6, 7, 13], "token-by-token": list(range(14))}[feed_as]
    ref_out, ref = feed(rt, ids, cuts)
    out, state = feed(rt, ids, cuts, MODES[mode])
    assert state.writes == ref.writes == 3 and state.refused_writes == 0
    assert_close(out, ref_out, "logits")
    for layer in ref.spec.layers:
        assert_close(state.S[layer], ref.S[layer], "state")
    # the state keeps working outside the mode, and inside it again
    with MODES[mode]():
        rt.forward(tokens(4, seed=1), state)
    rt.forward(tokens(4, seed=2), state)
    assert state.writes == 5 and state.refused_writes == 0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_batched_gradient_rows_under_grad_free_modes(mode):
    rt = patched("gradient", chunk_size=4)
    ids = torch.stack([tokens(13, seed=1), tokens(13, seed=2)])
    ref = [rt.new_state(), rt.new_state()]
    rt.forward(ids, ref)
    got = [rt.new_state(), rt.new_state()]
    with MODES[mode]():
        rt.forward(ids[:, :6], got)
        rt.forward(ids[:, 6:], got)
    for a, b in zip(ref, got):
        assert a.writes == b.writes == 3
        for layer in a.spec.layers:
            assert_close(b.S[layer], a.S[layer], "state")
