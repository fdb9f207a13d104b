"""adapt-eval long-memory: the episode layout, causality of the probes, the random-direction control, and a small
run through the CLI with its curves and plots."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from adapt_runtime.eval.cli import main
from adapt_runtime.eval.tasks import TaskSpec, get_task
from adapt_runtime.eval.tasks.long_memory import PROBE, random_control
from click.testing import CliRunner

import adapt_runtime as ar

N = 600


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the bundled model is tiny: extra threads only spin on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundled():
    return ar.load_model("llama")


@pytest.fixture(scope="module")
def episodes(bundled):
    _, tok = bundled
    spec = TaskSpec(encode=lambda s: tok(s, add_special_tokens=False)["input_ids"], bos_id=tok.bos_token_id,
                    max_length=512, episodes=2, seed=0, ctx_lens=(N,))
    return get_task("long-memory").episodes(spec)


def test_the_episode_is_a_document_then_probe_turns(episodes) -> None:
    ep = episodes[0]
    assert ep.ctx_len == N and ep.breaks[0] == 512 and N in ep.breaks  # one window cut, then the first probe
    doc = ep.tokens[:N]
    for name, (a, b) in ep.spans.items():
        kind, _, tag = name.partition("_")
        if kind == "seen":  # the passage that ended `tag` tokens before the document's end, after a BOS
            d = int(tag)
            assert ep.tokens[a:b] == doc[N - PROBE - d : N - d] and ep.tokens[a - 1] == doc[0]
        elif kind == "needle":
            gold = ep.tokens[a:b]
            assert any(doc[i : i + len(gold)] == gold for i in range(N)), "the needle's answer is in the document"
    assert {n.split("_")[0] for n in ep.spans} == {"seen", "unseen", "needle"}
    assert sorted(q.distance for q in ep.queries) == sorted(q.distance for q in ep.queries if 0 < q.distance < N)


def _score(rule: str, ep, model):
    rt = ar.patch(model, rule=rule)
    try:
        task = get_task("long-memory")
        state = rt.new_state()
        score = task.score(rt, state, ep, adapt=rule != "none")
        return score, state
    finally:
        rt.unpatch()


def test_probes_do_not_write_and_never_see_each_other(episodes, bundled) -> None:
    model, _ = bundled
    ep = episodes[0]
    score, state = _score("hebbian", ep, model)
    assert state.writes == (N - 1) // 32  # the document's writes only: probes are scored with adapt=False
    a, b = ep.spans["unseen_1"]
    changed = list(ep.tokens)
    changed[a:b] = reversed(changed[a:b])
    other, _ = _score("hebbian", dataclasses.replace(ep, tokens=tuple(changed)), model)
    keep = np.ones(len(ep.tokens), dtype=bool)
    keep[a:b] = False
    np.testing.assert_array_equal(score.nll[keep], other.nll[keep])
    assert not np.array_equal(score.nll[a:b], other.nll[a:b])
    assert np.isnan(score.nll[:N]).all()  # the document itself is not a probe


def test_under_none_a_probe_scores_as_the_base_model_on_the_passage_alone(episodes, bundled) -> None:
    model, _ = bundled
    ep = episodes[1]
    score, state = _score("none", ep, model)
    a, b = ep.spans["unseen_0"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ep.tokens[a - 1 : b]])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ep.tokens[a:b]), reduction="none")
    np.testing.assert_allclose(score.nll[a:b], expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(score.control.nll, score.nll)  # S = 0: the control is the fresh state too
    assert state.is_zero


def test_the_control_has_each_layers_norm_in_a_random_direction(bundled) -> None:
    model, _ = bundled
    rt = ar.patch(model, rule="hebbian")
    try:
        state = rt.new_state()
        rt.read(torch.randint(3, 512, (300,), generator=torch.Generator().manual_seed(0)), state)
        control = random_control(state, seed=7)
    finally:
        rt.unpatch()
    for layer, S in state.S.items():
        R = control.S[layer]
        assert float(torch.linalg.vector_norm(R)) == pytest.approx(float(torch.linalg.vector_norm(S)), rel=1e-5)
        cosine = float((R * S).sum() / (torch.linalg.vector_norm(R) * torch.linalg.vector_norm(S)))
        assert abs(cosine) < 0.05
    torch.testing.assert_close(random_control(state, seed=7).S[layer], control.S[layer])  # seeded


def test_a_small_run_through_the_cli_writes_metrics_curves_and_plots(tmp_path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", "--rules", "none,hebbian", "--task", "long-memory", "--ctx-len",
                                    f"{N},900", "--episodes", "2", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = json.loads((out / "results.json").read_text())["results"]
    metrics = {(r["rule"], r["ctx_len"], r["metric"]): r for r in rows}
    for n in (N, 900):
        for m in ("seen_nll", "unseen_nll", "needle_nll", "needle_acc", "seen_vs_control", "unseen_vs_control"):
            assert ("hebbian", n, m) in metrics, m
        seen = metrics[("hebbian", n, "seen_nll")]["delta_vs_none"]
        assert seen["value"] < 0 and seen["ci95"] is not None  # reading the document lowers its passages' NLL
        assert metrics[("hebbian", n, "seen_vs_control")]["value"] > 0  # and not through the norm alone
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {f"long_memory_distance_{N}.png", "long_memory_distance_900.png", "long_memory_length.png"} <= plots
    assert any("seen_nll_by_distance" in p.name for p in (out / "curves").glob("*.csv"))
