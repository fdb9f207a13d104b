"""``state_rank``: fast weights held as low-rank factors (``adapt_runtime.lowrank``) against the dense state."""

from __future__ import annotations

import pytest
import torch
from core_testing import assert_close, patched, tokens

from adapt_runtime import lowrank
from adapt_runtime.rules import Write

RULES = [
    # pinned to what a rank-r state takes (HebbianRule.rank_defaults: plain writes, bound 0.05), for the dense side too
    pytest.param("hebbian", {"decay": 0.9, "clip": 0.05, "write_form": "plain", "norm_bound": 0.05},
                 id="hebbian-decay-clip"),
    pytest.param("gradient", {}, id="gradient"),
]


def _product(state, layer: int):
    return lowrank.dense(state.factors.get(layer), state.spec.shapes[state.spec.layers.index(layer)])


@pytest.mark.parametrize(("rule", "opts"), RULES)
def test_rank_above_the_accumulated_rank_equals_dense(rule, opts) -> None:
    # 3 writes of chunk 4: S has rank <= 12 < 32 = min(d, f), so the truncation keeps everything
    ids = tokens(3 * 4 + 3)
    dense_rt = patched(rule, chunk_size=4, **opts)
    low_rt = patched(rule, chunk_size=4, state_rank=32, **opts)
    dense_state, low_state = dense_rt.new_state(), low_rt.new_state()
    assert_close(low_rt.forward(ids, low_state), dense_rt.forward(ids, dense_state), "logits")
    assert low_state.writes == dense_state.writes == 3
    assert all(s is None for s in low_state.S.values())
    for layer in dense_rt.config.layers:
        assert_close(_product(low_state, layer), dense_state.S[layer], "state")


def test_lower_rank_is_the_best_rank_r_approximation_after_one_write() -> None:
    ids = tokens(7 + 1, seed=3)
    dense_rt = patched("hebbian", norm_bound=0)
    low_rt = patched("hebbian", state_rank=2, norm_bound=0)
    dense_state, low_state = dense_rt.new_state(), low_rt.new_state()
    dense_rt.forward(ids, dense_state)
    low_rt.forward(ids, low_state)
    for layer in dense_rt.config.layers:
        u, sigma, vh = torch.linalg.svd(dense_state.S[layer])
        assert sigma[2] > 1e-3 * sigma[0]  # the write has rank > 2, so truncation drops something
        best = (u[:, :2] * sigma[:2]) @ vh[:2]
        assert_close(_product(low_state, layer), best, "state")


def test_fold_write_matches_the_svd_of_decayed_state_plus_clipped_write() -> None:
    gen = torch.Generator().manual_seed(0)
    d, f, C, r = 12, 9, 5, 3
    B, A = torch.randn(d, 4, generator=gen), torch.randn(4, f, generator=gen)
    V, X, beta = torch.randn(C, d, generator=gen), torch.randn(C, f, generator=gen), torch.rand(C, generator=gen)
    update = (V * beta[:, None]).T @ X
    max_norm = 0.5 * float(torch.linalg.vector_norm(update))
    target = 0.8 * (B @ A) + update * 0.5
    u, sigma, vh = torch.linalg.svd(target)
    w = Write(layer=0, V=V, X=X, beta=beta)
    out = lowrank.fold_write((B, A), (d, f), w, 0.8, max_norm, r)
    assert out[0].shape == (d, r) and out[1].shape == (r, f)
    assert_close(out[0] @ out[1], (u[:, :r] * sigma[:r]) @ vh[:r], "definition")


def test_memory_is_rank_times_d_plus_f_per_layer() -> None:
    rt = patched("hebbian", chunk_size=4, state_rank=3)
    state = rt.new_state()
    rt.forward(tokens(6 * 4 + 1), state)  # 6 writes: rank up to 24 before truncation
    assert state.writes == 6
    for layer, (d, f) in zip(rt.config.layers, rt.state_spec.shapes):
        B, A = state.factors[layer]
        assert B.shape == (d, 3) and A.shape == (3, f) and B.dtype == A.dtype == torch.float32
    held = sum(t.numel() for pair in state.factors.values() for t in pair)
    assert held == sum(3 * (d + f) for d, f in rt.state_spec.shapes)
    assert held < sum(d * f for d, f in rt.state_spec.shapes)


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_causality_a_later_token_changes_no_earlier_logit(rule) -> None:
    rt = patched(rule, chunk_size=4, state_rank=2)
    ids = tokens(22, seed=5)
    changed = ids.clone()
    changed[15] = 3 if int(ids[15]) != 3 else 4
    first, second = rt.forward(ids, rt.new_state()), rt.forward(changed, rt.new_state())
    assert_close(second[0, :15], first[0, :15], "prefix")
    assert not torch.allclose(second[0, 16:], first[0, 16:])


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_batched_rows_equal_rows_alone_and_pieces_equal_one_call(rule) -> None:
    rt = patched(rule, chunk_size=4, state_rank=3)
    ids = torch.stack([tokens(18, seed=1), tokens(18, seed=2)])
    alone = [rt.new_state(), rt.new_state()]
    expected = torch.cat([rt.forward(ids[b], alone[b]) for b in range(2)])
    rows = [rt.new_state(), rt.new_state()]
    got = torch.cat([rt.forward(ids[:, :5], rows), rt.forward(ids[:, 5:], rows)], dim=1)
    assert_close(got, expected, "logits")
    for a, b in zip(alone, rows):
        assert a.writes == b.writes == 4
        for layer in rt.config.layers:
            assert_close(_product(b, layer), _product(a, layer), "state")


def test_fork_copies_factors_and_reset_drops_them() -> None:
    rt = patched("hebbian", chunk_size=4, state_rank=3)
    state = rt.new_state()
    rt.forward(tokens(9), state)
    fork = state.clone()
    more = tokens(4, seed=9)
    assert_close(rt.forward(more, fork), rt.forward(more, state), "same-call")
    state.reset()
    assert state.factors == {} and state.nbytes == 0


def test_dense_config_json_is_unchanged_and_bad_ranks_are_refused() -> None:
    assert "state_rank" not in patched("hebbian").config.to_json()
    assert '"state_rank": 4' in patched("hebbian", state_rank=4).config.to_json()
    with pytest.raises(ValueError, match="state_rank"):
        patched("hebbian", state_rank=0)
    with pytest.raises(ValueError, match="state_rank"):
        patched("hebbian", state_rank=4, state_dtype="bfloat16")
    # saving a rank-r state is no longer refused: see test_lowrank_state_file.py


def test_a_rank_r_state_takes_the_rules_rank_defaults_and_given_options_win() -> None:
    from adapt_runtime.rules import HebbianRule

    dense, low = patched("hebbian"), patched("hebbian", state_rank=4)
    assert {k: dense.config.options[k] for k in HebbianRule.default_steps} == HebbianRule.default_steps
    assert dense.config.norm_bound == HebbianRule.default_norm_bound
    assert low.rule.steps.plain and low.config.norm_bound == HebbianRule.rank_defaults["norm_bound"]
    assert patched("hebbian", state_rank=4, norm_bound=0.2).config.norm_bound == 0.2
    with pytest.raises(ValueError, match="dense state"):  # step options a rank-r state cannot take, asked for
        patched("hebbian", state_rank=4, write_form="delta")
