"""The semantics of ARCHITECTURE §3: zero state == base, causality, chunking invariance, batching, isolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_testing import VOCAB, assert_close, patched, tiny_model, tokens, tolerance

import adapt_runtime as ar

RULES = ["none", "hebbian", "hebbian-output", "gradient"]
WRITING = ["hebbian", "hebbian-output", "gradient"]


def base_logits(rt, ids: torch.Tensor) -> torch.Tensor:
    for wrapper in rt.plastic.values():
        assert wrapper.binding is None
    with torch.no_grad():
        return rt.model(ids[None]).logits.float()


@pytest.mark.parametrize("rule", RULES)
def test_zero_state_is_base_bit_for_bit(rule):
    rt = patched(rule, chunk_size=7)
    ids = tokens(7)  # one chunk: no write can fire yet
    assert torch.equal(rt.forward(ids, rt.new_state()), base_logits(rt, ids))


def test_none_rule_equals_base_on_long_stream():
    rt = patched("none", chunk_size=4)
    ids = tokens(40)
    state = rt.new_state()
    assert torch.equal(rt.forward(ids, state), base_logits(rt, ids))
    assert state.writes == 0 and state.is_zero


@pytest.mark.parametrize("rule", WRITING)
def test_writes_change_later_chunks_only(rule):
    rt = patched(rule, chunk_size=8)
    ids = tokens(32)
    state = rt.new_state()
    out = rt.forward(ids, state)
    ref = base_logits(rt, ids)
    # chunk 0 is computed with S_0 = 0 (in an 8-token call, so equal up to matmul blocking, not bit for bit)
    assert_close(out[:, :8], ref[:, :8], "same-call")
    assert not torch.allclose(out[:, 9:], ref[:, 9:], **tolerance("logits"))
    assert state.writes == 3  # chunks 0, 1, 2 complete and labelled; chunk 3 waits for its next token


@pytest.mark.parametrize("chunk", [1, 7, 32], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("rule", RULES)
def test_causality(rule, chunk):
    rt = patched(rule, chunk_size=chunk)
    ids = tokens(45)
    p = 23
    other = ids.clone()
    other[p + 1] = 3 + (int(ids[p + 1]) - 2) % (VOCAB - 3)  # one token changed; the later ones stay
    a = rt.forward(ids, rt.new_state())
    b = rt.forward(other, rt.new_state())
    alone = rt.forward(ids[: p + 1], rt.new_state())  # the prefix with no future at all
    assert_close(a[:, : p + 1], b[:, : p + 1], "prefix")
    assert_close(a[:, : p + 1], alone, "prefix")
    # the change reaches the later positions through the context (their own tokens are the same)
    assert not torch.allclose(a[:, p + 2 :], b[:, p + 2 :], **tolerance("logits"))


@pytest.mark.parametrize("rule", WRITING)
@pytest.mark.parametrize("feed", ["pieces", "token-by-token"])
def test_one_call_equals_pieces(rule, feed):
    rt = patched(rule, chunk_size=7)
    ids = tokens(30)
    whole = rt.new_state()
    ref = rt.forward(ids, whole)
    state = rt.new_state()
    cuts = [0, 3, 10, 11, 21, 30] if feed == "pieces" else list(range(31))
    out = torch.cat([rt.forward(ids[a:b], state) for a, b in zip(cuts, cuts[1:])], dim=1)
    assert_close(out, ref, "logits")
    assert state.writes == whole.writes > 0
    for layer in state.spec.layers:
        assert_close(state.S[layer], whole.S[layer], "state")


@pytest.mark.parametrize("rule", WRITING)
def test_batched_rows_equal_rows_alone(rule):
    rt = patched(rule, chunk_size=5)
    prefixes = [tokens(9, seed=1), tokens(16, seed=2), tokens(3, seed=3)]  # different stream lengths
    nxt = torch.stack([tokens(8, seed=10 + i) for i in range(3)])
    alone, batched = [], []
    for prefix in prefixes:
        a, b = rt.new_state(), rt.new_state()
        rt.forward(prefix, a)
        rt.forward(prefix, b)
        alone.append(a)
        batched.append(b)
    expected = torch.cat([rt.forward(nxt[i], s) for i, s in enumerate(alone)])
    got = rt.forward(nxt, batched)
    assert_close(got, expected, "logits")
    for a, b in zip(alone, batched):
        assert a.writes == b.writes and a.tokens == b.tokens
        for layer in a.spec.layers:
            if a.S[layer] is None:
                assert b.S[layer] is None
            else:
                assert_close(b.S[layer], a.S[layer], "state")


@pytest.mark.parametrize("rule", WRITING)
def test_rows_never_see_each_others_state(rule):
    rt = patched(rule, chunk_size=4)
    busy, quiet = rt.new_state(), rt.new_state()
    rt.forward(tokens(30, seed=5), busy)
    probe = tokens(6, seed=6)
    alone = rt.forward(probe, quiet.clone())
    both = rt.forward(torch.stack([probe, tokens(6, seed=7)]), [quiet, busy.clone()])
    assert_close(both[:1], alone, "same-call")


def test_adapt_false_never_writes():
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    rt.forward(tokens(30), state, adapt=False)
    assert state.is_zero and state.writes == 0 and state.tokens_seen == 30


def test_drop_kv_keeps_fast_weights():
    """After drop_kv the next tokens are read from position 0 with no context, through W0 + S: the same logits as
    the base model with S added to its down projections by hand."""
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    rt.forward(tokens(20), state)
    assert not state.is_zero
    kept = {layer: S.clone() for layer, S in state.S.items()}
    state.drop_kv()
    assert state.kv_len == 0 and state.tokens_seen == 20
    nxt = tokens(3, seed=3)  # within the current chunk: no write fires
    out = rt.forward(nxt, state, adapt=False)
    assert state.kv_len == 3 and state.tokens_seen == 23
    assert all(torch.equal(state.S[layer], S) for layer, S in kept.items())
    hooks = [wrapper.base.register_forward_hook(lambda m, args, y, S=kept[i]: y + args[0] @ S.T)
             for i, wrapper in rt.plastic.items()]
    try:
        expected = base_logits(rt, nxt)
    finally:
        for h in hooks:
            h.remove()
    assert_close(out, expected, "same-call")


def test_context_overflow_is_a_clear_error():
    rt = patched("hebbian", chunk_size=4)
    state = rt.new_state()
    with pytest.raises(ar.ContextOverflowError, match="drop_kv"):
        rt.forward(tokens(rt.max_length + 1), state)
    assert state.tokens_seen == 0


def test_bad_inputs_are_rejected():
    rt = patched("hebbian")
    with pytest.raises(ValueError, match="token ids"):
        rt.forward([1, 2, 10_000], rt.new_state())
    with pytest.raises(ValueError, match="states"):
        rt.forward(torch.zeros(2, 3, dtype=torch.long), rt.new_state())
    other = patched("hebbian")
    with pytest.raises(ValueError, match="another runtime"):
        rt.forward([1, 2], other.new_state())


@pytest.mark.parametrize("rule", WRITING)
def test_batched_decode_steps_equal_rows_alone(rule):
    """Consecutive one-token steps of the same rows (the server's decode loop, which reuses the padded cache)."""
    rt = patched(rule, chunk_size=4)
    prefixes = [tokens(5, seed=1), tokens(11, seed=2), tokens(2, seed=3)]
    alone = [rt.new_state() for _ in prefixes]
    batched = [rt.new_state() for _ in prefixes]
    for prefix, a, b in zip(prefixes, alone, batched):
        rt.forward(prefix, a)
        rt.forward(prefix, b)
    steps = torch.stack([tokens(9, seed=20 + i) for i in range(3)])
    for t in range(steps.shape[1]):
        if t == 5:
            batched[1].drop_kv()  # a row changed between steps: the next step must rebuild the batch
            alone[1].drop_kv()
        got = rt.forward(steps[:, t : t + 1], batched)
        expected = torch.cat([rt.forward(steps[i, t : t + 1], s) for i, s in enumerate(alone)])
        assert_close(got, expected, "logits")
    for a, b in zip(alone, batched):
        assert a.writes == b.writes > 0 and a.kv_len == b.kv_len


def test_adapt_false_mid_chunk_keeps_hebbian_targets_with_their_keys():
    """Chunk 0 is read as adapt, no-adapt, adapt: its write must pair each adapted position's key with that
    position's own target (the unadapted positions 3 and 4 are skipped), checked against the rule's formula
    computed here from the base model's keys and logits (S is zero during chunk 0)."""
    C, lr = 8, 4.0
    model = tiny_model()
    ids = tokens(C + 1)
    keys = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, args, out, i=i: keys.__setitem__(i, args[0][0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        logits = model(ids[None, :C]).logits[0].float()
    for h in hooks:
        h.remove()
    kept = torch.tensor([0, 1, 2, 5, 6, 7], device=ids.device)
    U = model.get_output_embeddings().weight.detach().float()
    v = (F.one_hot(ids[1 : C + 1], VOCAB).float() - logits.softmax(-1)) @ U  # the error target, by definition
    mean_sq = torch.stack([keys[i][kept].pow(2).sum(-1).mean() for i in keys]).mean()
    beta = lr / (len(kept) * mean_sq)
    expected = {i: beta * v[kept].T @ keys[i][kept] for i in keys}

    rt = ar.patch(model, rule="hebbian", chunk_size=C, lr=lr, topk=0, norm_jacobian=False, layers="all",
                  norm_bound=0)  # the reference's setup: every layer, no S bound
    state = rt.new_state()
    rt.forward(ids[:3], state)
    rt.forward(ids[3:5], state, adapt=False)
    rt.forward(ids[5:], state)
    assert state.writes == 1 and state.tokens_seen == C + 1
    for i in expected:
        assert_close(state.S[i], expected[i], "reference")
