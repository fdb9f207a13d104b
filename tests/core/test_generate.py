"""Generation and sampling, on the bundled model and tiny ones."""

from __future__ import annotations

import pytest
import torch
from core_testing import patched, tokens

import adapt_runtime as ar


def test_greedy_matches_argmax_of_forward():
    rt = patched("hebbian", chunk_size=4)
    prompt = tokens(6)
    out = list(rt.generate(prompt, rt.new_state(), max_new_tokens=10))
    check = rt.new_state()
    logits = rt.forward(prompt, check)[0, -1]
    for tok in out:
        assert tok == int(logits.argmax())
        logits = rt.forward([tok], check)[0, -1]


def test_generation_adapts_and_leaves_the_last_token_unfed():
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    out = list(rt.generate(tokens(6), state, max_new_tokens=9))
    assert len(out) == 9 and state.tokens_seen == 6 + 8 and state.writes == 3
    assert state.tokens[6:] == out[:-1]


def test_seeded_sampling_is_reproducible_and_stops():
    rt = patched("none")
    runs = [list(rt.generate(tokens(5), rt.new_state(), max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20,
                             seed=7)) for _ in range(2)]
    assert runs[0] == runs[1]
    stop = runs[0][3]
    stopped = list(rt.generate(tokens(5), rt.new_state(), max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20,
                               seed=7, stop_ids=[stop]))
    assert stopped[-1] == stop and len(stopped) == runs[0].index(stop) + 1


def test_generate_continues_from_state():
    rt = patched("none")
    state = rt.new_state()
    first = list(rt.generate(tokens(5), state, max_new_tokens=4))
    rt.forward([first[-1]], state)
    more = list(rt.generate([], state, max_new_tokens=3))
    whole = list(rt.generate(tokens(5), rt.new_state(), max_new_tokens=7))
    assert first + more == whole


@pytest.mark.parametrize(("top_k", "top_p"), [(1, 1.0), (0, 1e-6)], ids=["top_k=1", "top_p~0"])
def test_sampling_filters_reduce_to_greedy(top_k, top_p):
    logits = torch.randn(4, 50)
    got = ar.sample(logits, temperature=1.0, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1))


def test_bundled_model_greedy_story(bundled):
    model, tokenizer = bundled
    rt = ar.patch(model, rule="none")
    try:
        ids = tokenizer("Once upon a time", return_tensors="pt").input_ids[0]
        text = tokenizer.decode(list(rt.generate(ids, rt.new_state(), max_new_tokens=20)))
    finally:
        rt.unpatch()
    assert text.startswith(" there was a little girl named Lily") or "Lily" in text
