"""The scorer: equal to the base model at S = 0, strictly causal under every rule, block-local with a window."""

import numpy as np
import pytest
import torch
from adapt_runtime.eval.episode import Episode, EpisodeBuilder
from adapt_runtime.eval.results import aggregate
from adapt_runtime.eval.scoring import score_episode
from adapt_runtime.eval.tasks import TaskSpec, get_task

import adapt_runtime as ar

RULES = ["none", "hebbian", "gradient"]
CHUNK = 16


def runtime(rule, chunk_size=CHUNK):
    model, tok = ar.load_model("llama")
    return ar.patch(model, rule=rule, chunk_size=chunk_size), tok


def text_episode(tok, n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [tok.bos_token_id] + torch.randint(3, 512, (n - 1,), generator=g).tolist()
    return Episode("t", "v", None, n, 0, 0, tuple(ids))


def mc_episode(tok):
    b = EpisodeBuilder(lambda s: tok(s, add_special_tokens=False)["input_ids"], tok.bos_token_id)
    for k, v in [("apple", "red"), ("river", "blue"), ("table", "green")] * 6:
        b.text(f"{k}: {v}\n")
    b.text("river:")
    b.answer(" blue", [" red", " blue", " green"])
    b.text("\nThe end of the list.")
    return b.build("t", "v", 3, None, 0, 0)


@pytest.mark.parametrize("rule", RULES)
def test_fresh_state_scores_like_the_base_model(rule):
    """S = 0 scores as the base model through the plastic layers; adapting, the first chunk still does (it is read
    with S_0 = 0) and the later ones do not (they are read with the writes)."""
    rt, tok = runtime(rule)
    ep = text_episode(tok)
    fresh = score_episode(rt, rt.new_state(), ep, adapt=False)
    adapted = score_episode(rt, rt.new_state(), ep, adapt=True)
    rt.unpatch()
    with torch.no_grad():
        logits = rt.model(torch.tensor([ep.tokens])).logits[0].float()
    ref = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ep.tokens[1:]), reduction="none")
    ref = ref.double().numpy()
    np.testing.assert_allclose(fresh.nll[1:], ref, rtol=1e-5, atol=1e-5)
    assert np.isnan(fresh.nll[0]) and np.isnan(adapted.nll[0])
    np.testing.assert_allclose(adapted.nll[1:CHUNK], ref[: CHUNK - 1], rtol=1e-5, atol=1e-5)
    if rule == "none":
        np.testing.assert_allclose(adapted.nll[1:], ref, rtol=1e-5, atol=1e-5)
    else:
        assert not np.allclose(adapted.nll[CHUNK + 1 :], ref[CHUNK:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("cut", [CHUNK * 3 - 1, CHUNK * 3, 77], ids=lambda c: f"cut{c}")
def test_perturbing_later_tokens_leaves_earlier_scores_unchanged(rule, cut):
    """One token changed at ``cut + 1``: every score up to ``cut`` is the same, and the scores after ``cut + 1``
    (same tokens, changed context) are not."""
    rt, tok = runtime(rule)
    ep = text_episode(tok)
    base = score_episode(rt, rt.new_state(), ep, adapt=rule != "none")
    tokens = list(ep.tokens)
    tokens[cut + 1] = 3 + (tokens[cut + 1] - 2) % 509  # another id in [3, 512)
    perturbed = Episode(**{**ep.__dict__, "tokens": tuple(tokens)})
    other = score_episode(rt, rt.new_state(), perturbed, adapt=rule != "none")
    np.testing.assert_allclose(other.nll[: cut + 1], base.nll[: cut + 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(other.nll[cut + 2 :], base.nll[cut + 2 :], rtol=1e-5, atol=1e-5), \
        "the changed token did not reach the later positions through the context"


@pytest.mark.parametrize("rule", RULES)
def test_multiple_choice_does_not_leak_into_the_stream(rule):
    rt, tok = runtime(rule)
    ep = mc_episode(tok)
    with_mc = score_episode(rt, rt.new_state(), ep, adapt=rule != "none")
    plain = Episode(**{**ep.__dict__, "queries": ()})
    without = score_episode(rt, rt.new_state(), plain, adapt=rule != "none")
    # The query cut splits the stream inside a chunk: equal up to float reassociation.
    np.testing.assert_allclose(with_mc.nll, without.nll, rtol=1e-4, atol=1e-4)
    q, s = ep.queries[0], with_mc.queries[0]
    assert s.logprobs[q.gold] == pytest.approx(-with_mc.nll[q.start : q.end].sum(), abs=1e-4)


@pytest.mark.parametrize("rule", ["none", "gradient"])
def test_attention_window_is_block_local(rule):
    rt, tok = runtime(rule)
    ep = text_episode(tok, n=200)
    seen = []
    forward = rt.forward

    def spy(ids, state, adapt=True):
        out = forward(ids, state, adapt=adapt)
        seen.append(state.kv_len)
        return out

    rt.forward = spy
    window = 64
    local = score_episode(rt, rt.new_state(), ep, adapt=rule != "none", window=window)
    rt.forward = forward
    full = score_episode(rt, rt.new_state(), ep, adapt=rule != "none")
    assert max(seen) <= window
    np.testing.assert_allclose(local.nll[:window], full.nll[:window], rtol=1e-4, atol=1e-4)
    assert not np.allclose(local.nll[window:], full.nll[window:])


def test_none_vs_none_deltas_are_exactly_zero():
    _, tok = runtime("none")
    spec = TaskSpec(lambda s: tok(s, add_special_tokens=False)["input_ids"], tok.bos_token_id, 512, 3, 0,
                    shots=(2,), ctx_lens=(96,))
    samples = []
    for label in ("none", "none-again"):
        rt, _ = runtime("none")
        for name in ("longdoc-ppl", "assoc-recall"):
            task = get_task(name)
            for ep in task.episodes(spec):
                m = task.measure(ep, score_episode(rt, rt.new_state(), ep, adapt=False))
                samples.append({"rule": label, "task": ep.task, "variant": ep.variant, "shots": ep.shots,
                                "ctx_len": ep.ctx_len, "episode": ep.index, "metrics": m.metrics,
                                "curves": m.curves})
    rows, curves = aggregate(samples, ["none", "none-again"])
    again = [r for r in rows + curves if r["rule"] == "none-again"]
    assert again and all(r["delta_vs_none"]["value"] == 0.0 for r in again)
    assert all(r["delta_vs_none"]["ci95"] in (None, [0.0, 0.0]) for r in again)
