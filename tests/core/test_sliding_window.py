"""Sliding-window models (Mistral with a window, Gemma2's alternating layers, Gemma3) with a window smaller than
the stream: cached calls equal the model's own windowed forward, rows past the window at different lengths batch
like rows alone, and the gradient rule fed token by token equals one call."""

from __future__ import annotations

import pytest
import torch
from core_testing import assert_close, tiny_model, tokens

import adapt_runtime as ar

WINDOW = 6
ARCHS = ["mistral", "gemma2", "gemma3_text"]


def windowed(arch: str) -> torch.nn.Module:
    model = tiny_model(arch, sliding_window=WINDOW)
    assert model.config.sliding_window == WINDOW
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_pieces_equal_the_windowed_forward(arch):
    model = windowed(arch)
    ids = tokens(3 * WINDOW + 2)
    with torch.no_grad():
        ref = model(ids[None]).logits.float()
        full = model(ids[None], attention_mask=None).logits.float()
    rt = ar.patch(model, rule="none")
    state = rt.new_state()
    cuts = [0, 4, 5, 11, len(ids)]
    out = torch.cat([rt.forward(ids[a:b], state) for a, b in zip(cuts, cuts[1:])], dim=1)
    assert_close(out, ref, "logits")
    assert torch.equal(ref, full)


@pytest.mark.parametrize(("arch", "rule"), [*((arch, "hebbian") for arch in ARCHS), ("gemma2", "gradient")],
                         ids=lambda v: v)
def test_rows_past_the_window_batch_like_rows_alone(arch, rule):
    rt = ar.patch(windowed(arch), rule=rule, chunk_size=4, lr=2.0)
    prefixes = [tokens(3 * WINDOW, seed=1), tokens(WINDOW + 3, seed=2), tokens(2, seed=3)]
    alone = [rt.new_state() for _ in prefixes]
    batched = [rt.new_state() for _ in prefixes]
    for prefix, a, b in zip(prefixes, alone, batched):
        rt.forward(prefix, a)
        rt.forward(prefix, b)
    steps = torch.stack([tokens(6, seed=20 + i) for i in range(3)])
    for t in range(steps.shape[1]):  # decode steps, the server's loop
        got = rt.forward(steps[:, t : t + 1], batched)
        expected = torch.cat([rt.forward(steps[i, t : t + 1], s) for i, s in enumerate(alone)])
        assert_close(got, expected, "logits")
    for a, b in zip(alone, batched):
        assert a.writes == b.writes > 0
        for layer in a.spec.layers:
            assert_close(b.S[layer], a.S[layer], "state")


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_token_by_token_equals_one_call_past_the_window(arch):
    rt = ar.patch(windowed(arch), rule="gradient", chunk_size=4, lr=0.5)
    ids = tokens(3 * WINDOW + 1)
    whole = rt.new_state()
    ref = rt.forward(ids, whole)
    state = rt.new_state()
    out = torch.cat([rt.forward(ids[t : t + 1], state) for t in range(len(ids))], dim=1)
    assert state.writes == whole.writes == 4
    assert_close(out, ref, "logits")
    for layer in whole.spec.layers:
        assert_close(state.S[layer], whole.S[layer], "state")


def test_a_cache_trimmed_to_the_window_is_a_clear_error():
    """Every layer keeps the whole KV; a state whose sliding layers were trimmed (an old cache) cannot be
    continued in context, and says how to continue without it."""
    rt = ar.patch(windowed("gemma2"), rule="hebbian", chunk_size=4, lr=2.0)
    state = rt.new_state()
    rt.forward(tokens(2 * WINDOW), state)
    assert all(k.shape[-2] == 2 * WINDOW for k, _ in state.kv)
    state.kv[0] = tuple(t[:, :, -WINDOW:] for t in state.kv[0])
    with pytest.raises(ValueError, match="drop_kv"):
        rt.forward(tokens(1, seed=1), state)
    state.drop_kv()
    rt.forward(tokens(1, seed=1), state)
    assert state.kv_len == 1


def test_a_state_file_with_a_trimmed_sliding_cache_is_refused_on_load():
    """The same trimmed cache in a state file is a malformed file (the server's 400), caught on load rather than at
    the next turn; the untrimmed state past the window loads."""
    rt = ar.patch(windowed("gemma2"), rule="hebbian", chunk_size=4, lr=2.0)
    state = rt.new_state()
    rt.forward(tokens(2 * WINDOW), state)
    assert ar.state_from_bytes(state.to_bytes(), rt).kv_len == 2 * WINDOW
    state.kv[0] = tuple(t[:, :, -WINDOW:] for t in state.kv[0])
    with pytest.raises(ar.MalformedStateError, match="layer 0"):
        ar.state_from_bytes(state.to_bytes(), rt)
