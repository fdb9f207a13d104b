"""``rt.read``: a document longer than the context, read window by window into the fast weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from core_testing import patched, tokens

from adapt_runtime.read import ReadResult, window_spans


def test_window_spans_end_on_absolute_chunk_boundaries() -> None:
    # a stream already 10 tokens long, chunks of 7, windows of at most 21: boundaries at stream positions 28, 49
    assert window_spans(10, 60, 21, 7) == [(0, 18), (18, 39), (39, 60)]
    assert window_spans(0, 50, 20, 10) == [(0, 20), (20, 40), (40, 50)]
    # windows shorter than a chunk: cut where no boundary falls inside, else at it (8)
    assert window_spans(0, 12, 5, 8) == [(0, 5), (5, 8), (8, 12)]
    assert window_spans(3, 0, 5, 8) == []


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_read_equals_feeding_the_windows_by_hand(rule: str) -> None:
    rt = patched(rule, chunk_size=7)
    prefix, doc = tokens(10, seed=1), tokens(60, seed=2)
    state, by_hand = rt.new_state(), rt.new_state()
    rt.forward(prefix, state)
    rt.forward(prefix, by_hand)
    result = rt.read(doc, state, window=21)
    for a, b in [(0, 18), (18, 39), (39, 60)]:
        by_hand.drop_kv()
        rt.forward(doc[a:b], by_hand)
    assert result.windows == 3 and result.tokens == 60
    assert state.tokens == by_hand.tokens and state.kv_len == by_hand.kv_len == 21
    assert state.writes == by_hand.writes and result.writes == by_hand.writes - 1  # the prefix wrote once
    for layer in state.S:
        torch.testing.assert_close(state.S[layer], by_hand.S[layer], rtol=1e-5, atol=1e-6)
    assert not state.is_zero


def test_window_nll_is_the_mean_next_token_nll_of_each_window() -> None:
    rt = patched("none", chunk_size=10)
    doc = tokens(50, seed=3)
    result = rt.read(doc, rt.new_state(), window=20)
    expected = []
    for a, b in [(0, 20), (20, 40), (40, 50)]:
        with torch.no_grad():
            logits = rt.model(input_ids=doc[None, a:b]).logits[0]
        expected.append(float(F.cross_entropy(logits[:-1], doc[a + 1 : b])))
    assert result.window_nll == pytest.approx(expected, rel=1e-5)
    assert result.writes == 0 and result.mean_nll == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_forty_windows_on_the_bundled_model(bundled, capsys) -> None:
    import adapt_runtime as ar

    model, _ = bundled
    rt = ar.patch(model, rule="hebbian")
    try:
        C = rt.config.chunk_size
        doc = torch.randint(3, rt.vocab_size, (42 * 64,), generator=torch.Generator().manual_seed(0))
        seen: list[tuple[int, int]] = []
        state = rt.new_state()
        result = rt.read(doc, state, window=64, progress=True, on_window=lambda k, n, _: seen.append((k, n)))
    finally:
        rt.unpatch()
    assert isinstance(result, ReadResult)
    assert (result.tokens, result.windows) == (42 * 64, 42)
    assert result.writes == 42 * 64 // C - 1  # every chunk but the last, whose write waits for its label
    assert result.refused_writes == 0 and state.kv_len == 64 and state.tokens_seen == 42 * 64
    assert len(result.window_nll) == 42 and all(math.isfinite(x) for x in result.window_nll)
    assert seen == [(k, 64 * k) for k in range(1, 43)]
    assert "read" in capsys.readouterr().err
    with pytest.raises(AttributeError):
        result.tokens = 0  # frozen


def test_a_window_longer_than_the_context_is_refused() -> None:
    rt = patched("hebbian")
    with pytest.raises(ValueError, match="longer than the model's context"):
        rt.read(tokens(10), rt.new_state(), window=rt.max_length + 1)
    with pytest.raises(ValueError, match="positive"):
        rt.read(tokens(10), rt.new_state(), window=0)


def test_a_one_token_window_has_no_score_and_the_default_window_is_the_context() -> None:
    rt = patched("hebbian", chunk_size=8)  # 256 positions: 32 whole chunks
    result = rt.read(tokens(rt.max_length + 1), rt.new_state())
    assert result.windows == 2
    assert math.isnan(result.window_nll[1]) and result.to_dict()["window_nll"][1] is None


def test_norm_bound_rescales_a_write_onto_the_bound_instead_of_refusing_it() -> None:
    doc = tokens(8, seed=4)  # one chunk of 7 and the token that fires its write
    free, bounded = patched("hebbian", chunk_size=7), patched("hebbian", chunk_size=7, norm_bound=1e-3)
    s_free, s_bounded = free.new_state(), bounded.new_state()
    free.forward(doc, s_free)
    bounded.forward(doc, s_bounded)
    assert s_bounded.writes == s_free.writes == 1 and s_bounded.refused_writes == 0
    for layer, S in s_free.S.items():
        limit = 1e-3 * float(torch.linalg.vector_norm(free.plastic[layer].weight0))
        norm = float(torch.linalg.vector_norm(S))
        assert norm > limit  # the bound binds, so the check below can fail
        torch.testing.assert_close(s_bounded.S[layer], S * (limit / norm), rtol=1e-5, atol=1e-9)


def test_norm_bound_holds_every_layer_over_a_long_read() -> None:
    rt = patched("hebbian", chunk_size=7, norm_bound=0.01)
    state = rt.new_state()
    result = rt.read(tokens(400, seed=5), state, window=70)
    assert result.writes == (400 - 1) // 7 and result.refused_writes == 0  # a write fires on the next token
    ratios = [state.delta_norms()[i] / float(torch.linalg.vector_norm(rt.plastic[i].weight0)) for i in state.S]
    assert max(ratios) <= 0.01 * (1 + 1e-5) and max(ratios) == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(ValueError, match="norm_bound"):
        patched("hebbian", norm_bound=-1.0)
    assert patched("hebbian", norm_bound=0).config.norm_bound is None  # 0 turns the rule's default bound off
