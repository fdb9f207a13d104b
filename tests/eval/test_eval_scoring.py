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


def two_turn_episode(tok, n1=80, n2=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    first = [tok.bos_token_id] + torch.randint(3, 512, (n1 - 1,), generator=g).tolist()
    second = [tok.bos_token_id] + torch.randint(3, 512, (n2 - 1,), generator=g).tolist()
    return Episode("t", "v", None, n1, 0, 0, tuple(first + second), breaks=(n1,))


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_frozen_turns_score_later_turns_with_the_memory_fixed_and_still_learn_them(rule):
    """As ``adapt-serve --engine vllm``: turn 1 is read as usual, turn 2 is scored with S as it began (a fresh KV
    and ``adapt=False`` from that state), and the state still learns turn 2."""
    rt, tok = runtime(rule)
    ep = two_turn_episode(tok)
    n1 = ep.breaks[0]
    native, state = score_episode(rt, rt.new_state(), ep, adapt=True), rt.new_state()
    frozen = score_episode(rt, state, ep, adapt=True, frozen_turns=True)
    np.testing.assert_allclose(frozen.nll[:n1], native.nll[:n1], rtol=1e-6, atol=1e-6, equal_nan=True)
    after_first = rt.new_state()
    rt.forward(list(ep.tokens[:n1]), after_first)
    after_first.drop_kv()
    logp = torch.log_softmax(rt.forward(list(ep.tokens[n1:]), after_first.clone(), adapt=False)[0].float(), -1)
    want = -logp[torch.arange(len(ep.tokens) - n1 - 1), torch.tensor(ep.tokens[n1 + 1:])].double().numpy()
    np.testing.assert_allclose(frozen.nll[n1 + 1:], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(frozen.nll[n1 + 1:], native.nll[n1 + 1:], rtol=1e-5, atol=1e-5)
    learned = rt.new_state()
    rt.forward(list(ep.tokens[:n1]), learned)
    learned.drop_kv()
    rt.forward(list(ep.tokens[n1:]), learned)
    assert state.writes == learned.writes > 0 and state.tokens_seen == learned.tokens_seen
    for layer, S in learned.S.items():
        if S is not None:
            torch.testing.assert_close(state.S[layer], S)


def test_a_rule_at_vllm_runs_in_the_harness_and_pairs_with_the_baseline(tmp_path):
    from adapt_runtime.eval.config import RunConfig
    from adapt_runtime.eval.harness import run

    config = RunConfig(model="llama", rules=("none", "hebbian", "hebbian@vllm"), tasks=("session-memory",),
                       episodes=2, ctx_lens=(64,), preset="smoke")
    run(config, tmp_path / "run", progress=False, log=lambda _: None)
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    nll = {(r["rule"], r["variant"], r["episode"]): r["metrics"]["nll"] for r in rows}
    assert {k[0] for k in nll} == {"none", "hebbian", "hebbian@vllm"}
    assert any(nll[("hebbian", v, e)] != nll[("hebbian@vllm", v, e)] for _, v, e in nll)
