"""The step options every rule takes (``adapt_runtime.rules.steps``): the delta write form, normalised and
orthogonalised steps, per-layer rates. Each against its definition, and each keeps the runtime's invariants:
causality, batched rows == rows alone, state files (the options are part of a state's identity), refused writes."""

from __future__ import annotations

import pytest
import torch
from core_testing import VOCAB, assert_close, tiny_model, tokens, tolerance

import adapt_runtime as ar
from adapt_runtime.rules import Steps, Write
from adapt_runtime.rules.steps import NS_COEFFS, NS_STEPS, newton_schulz, with_defaults

LR = {"hebbian": 4.0, "gradient": 2.0}
OPTIONS = {
    "delta": {"write_form": "delta"},
    "delta-half": {"write_form": "delta", "erase": 0.5},
    "normalised": {"normalise": 0.02},
    "orthogonalised": {"orthogonalise": True},
    "rates": {"layer_rates": [0.5, 0.0, 2.0]},
    "all": {"write_form": "delta", "orthogonalise": True, "normalise": 0.02, "layer_rates": [1.0, 0.5, 2.0]},
}
# the invariants: each option under one rule at least, the delta form and everything together under both
INVARIANT_CASES = [("hebbian", "delta"), ("gradient", "delta"), ("hebbian", "all"), ("gradient", "all"),
                   ("gradient", "normalised"), ("hebbian", "orthogonalised"), ("gradient", "rates")]
CASES = [pytest.param(rule, name, id=f"{rule}-{name}") for rule, name in INVARIANT_CASES]
BATCHED_CASES = [c for c in CASES if c.id.endswith(("delta", "all", "normalised"))]  # the slowest invariant


def runtime(rule: str, options: dict, chunk_size: int = 5, **kwargs) -> ar.Runtime:
    # each option on top of the plain form, as its formula is written (hebbian's default form is the delta rule)
    options = {"norm_bound": 0, "write_form": "plain", **options, **kwargs}
    return ar.patch(tiny_model(), rule=rule, chunk_size=chunk_size, lr=LR[rule], **options)


def record_writes(rt: ar.Runtime, monkeypatch: pytest.MonkeyPatch) -> list[list[Write]]:
    """The rule's writes of every chunk, as the rule returned them (before the steps)."""
    seen: list[list[Write]] = []
    write = rt.rule.write

    def recording(chunk):
        writes = write(chunk)
        seen.append(writes)
        return writes

    monkeypatch.setattr(rt.rule, "write", recording)
    return seen


# ------------------------------------------------------------------ options


def test_defaults_record_no_step_option():
    """A rule at the defaults records its own options and only the step options it defaults to (hebbian's delta
    form, chosen by the long-read sweep), so a state file written at the defaults says which form wrote it."""
    assert ar.patch(tiny_model(), rule="gradient").config.options == {}
    options = ar.patch(tiny_model(), rule="hebbian").config.options
    assert set(options) == {"target", "modulation", "topk", "norm_jacobian", "write_form", "erase"}
    assert (options["write_form"], options["erase"]) == ("delta", 0.2)
    plain = ar.patch(tiny_model(), rule="hebbian", write_form="plain").config.options
    assert set(plain) == {"target", "modulation", "topk", "norm_jacobian"}  # as recorded before the delta default
    rt = runtime("gradient", OPTIONS["all"])
    assert rt.config.options == {"write_form": "delta", "orthogonalise": True, "normalise": 0.02,
                                 "layer_rates": [1.0, 0.5, 2.0]}


@pytest.mark.parametrize("bad", [{"write_form": "sideways"}, {"erase": -1.0}, {"erase": float("nan")},
                                 {"normalise": 0.0}, {"layer_rates": [1.0, -1.0, 1.0]}, {"layer_rates": "fast"},
                                 {"layer_rates": [1.0, 1.0]}, {"state_rank": 4, "write_form": "delta"}])
def test_bad_step_options_are_clear(bad):
    with pytest.raises(ValueError, match="write_form|erase|normalise|layer_rates|dense state"):
        ar.patch(tiny_model(), rule="gradient", **bad)


# ------------------------------------------------------------------ definitions


@pytest.mark.parametrize("rule,erase", [("gradient", 1.0), ("hebbian", 0.5)])
def test_delta_form_is_the_delta_rule(rule, erase, monkeypatch):
    """``S' = decay S + (V - erase decay X S^T)^T diag(beta) X`` with the rule's own V, X, beta (float64 here)."""
    decay = 0.9
    rt = runtime(rule, {"write_form": "delta", "erase": erase}, decay=decay)
    seen = record_writes(rt, monkeypatch)
    state = rt.new_state()
    rt.forward(tokens(11), state)  # chunks 0 and 1 written
    before = {i: S.clone() for i, S in state.S.items()}
    rt.forward(tokens(5, seed=1), state)  # chunk 2 written
    assert state.writes == 3 and len(seen) == 3
    for w in seen[-1]:
        S, V, X, b = before[w.layer].double(), w.V.double(), w.X.double(), w.beta.double()
        expected = decay * S + ((V - erase * decay * X @ S.T) * b[:, None]).T @ X
        assert_close(state.S[w.layer].double(), expected, "reference")


def test_delta_form_of_a_repeated_chunk_converges_to_its_targets(monkeypatch):
    """With keys orthonormal and rate 1, the delta form stores the targets exactly and writing them again changes
    nothing; the plain form would keep adding them."""
    rt = runtime("gradient", {"write_form": "delta"})
    state = rt.new_state()
    layer = rt.config.layers[0]
    d, f = state.spec.shapes[0]
    X = torch.linalg.qr(torch.randn(f, 4, dtype=torch.float64))[0].T.float()  # 4 orthonormal keys
    V = torch.randn(4, d)
    from adapt_runtime.write import apply_dense

    steps = Steps(write_form="delta")
    for _ in range(3):
        assert apply_dense(state, [Write(layer, V, X, torch.ones(4), steps)], 1.0, None, rt._w0_norm)
        assert_close(state.S[layer] @ X.T, V.T, "definition")
    assert state.writes == 3


def test_newton_schulz_in_the_gram_space_is_muons_iteration():
    """The `C x C` iteration equals Muon's quintic Newton-Schulz on the formed update, scaled to its norm."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 40, generator=g, dtype=torch.float64), torch.randn(6, 72, generator=g, dtype=torch.float64)
    U = A.T @ B
    X = U / U.norm()
    a, b, c = NS_COEFFS
    for _ in range(NS_STEPS):
        G = X @ X.T
        X = a * X + (b * G + c * G @ G) @ X
    expected = X * (U.norm() / X.norm())
    torch.testing.assert_close(newton_schulz(A, B).T @ B, expected, atol=1e-9, rtol=1e-9)
    sv = torch.linalg.svdvals(expected / expected.norm() * 6**0.5)[:6]
    assert float(sv.max() / sv.min()) < 2.0  # the spectrum is flattened (rank-6 U had a spread of singular values)
    assert not newton_schulz(A * 0, B).any()
    assert newton_schulz(A * float("inf"), B).isnan().all()


@pytest.mark.parametrize("rule", list(LR))
def test_normalised_step_has_the_norm_it_asks_for(rule):
    """With decay 1 and no clip, each layer's first write has the Frobenius norm ``normalise * rate * ||W0||``."""
    rates = [1.0, 0.5, 2.0]
    rt = runtime(rule, {"normalise": 0.02, "layer_rates": rates}, layers="all")
    state = rt.new_state()
    rt.forward(tokens(6), state)  # chunk 0 written once
    assert state.writes == 1
    for layer, rate in zip(rt.config.layers, rates):
        norm = torch.linalg.vector_norm(state.S[layer].double())
        torch.testing.assert_close(float(norm), 0.02 * rate * rt._w0_norm[layer], rtol=1e-4, atol=0)


@pytest.mark.parametrize("rule", list(LR))
def test_orthogonalised_step_keeps_the_norm_and_flattens_the_spectrum(rule):
    plain, ortho = runtime(rule, {}, layers="all"), runtime(rule, {"orthogonalise": True}, layers="all")
    ids = tokens(6)
    a, b = plain.new_state(), ortho.new_state()
    plain.forward(ids, a)
    ortho.forward(ids, b)
    for layer in plain.config.layers:
        assert_close(torch.linalg.vector_norm(b.S[layer]), torch.linalg.vector_norm(a.S[layer]), "definition")
        sa, sb = torch.linalg.svdvals(a.S[layer])[:5], torch.linalg.svdvals(b.S[layer])[:5]
        assert float(sb[0] / sb[-1]) < float(sa[0] / sa[-1])


@pytest.mark.parametrize("rule", list(LR))
def test_layer_rates_scale_each_layers_write(rule):
    plain, rated = runtime(rule, {}, layers="all"), runtime(rule, {"layer_rates": [0.5, 0.0, 2.0]}, layers="all")
    ids = tokens(6)
    a, b = plain.new_state(), rated.new_state()
    plain.forward(ids, a)
    rated.forward(ids, b)
    for layer, rate in zip(plain.config.layers, [0.5, 0.0, 2.0]):
        assert_close(b.S[layer], rate * a.S[layer], "definition")


# ------------------------------------------------------------------ invariants


@pytest.mark.parametrize("rule,name", CASES)
def test_causality(rule, name):
    rt = runtime(rule, OPTIONS[name], chunk_size=7)
    ids = tokens(30)
    p = 16
    other = ids.clone()
    other[p + 1] = 3 + (int(ids[p + 1]) - 2) % (VOCAB - 3)
    a = rt.forward(ids, rt.new_state())
    b = rt.forward(other, rt.new_state())
    alone = rt.forward(ids[: p + 1], rt.new_state())
    assert_close(a[:, : p + 1], b[:, : p + 1], "prefix")
    assert_close(a[:, : p + 1], alone, "prefix")
    assert not torch.allclose(a[:, p + 2 :], b[:, p + 2 :], **tolerance("logits"))


@pytest.mark.parametrize("rule,name", BATCHED_CASES)
def test_batched_rows_equal_rows_alone(rule, name):
    rt = runtime(rule, OPTIONS[name])
    prefixes = [tokens(9, seed=1), tokens(16, seed=2), tokens(3, seed=3)]
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
        assert a.writes == b.writes > 0
        for layer in a.spec.layers:
            if a.S[layer] is None:
                assert b.S[layer] is None
            else:
                assert_close(b.S[layer], a.S[layer], "state")


@pytest.mark.parametrize("rule,name", CASES)
def test_state_file_round_trip(rule, name, tmp_path):
    """A saved state continues as the original; a runtime with other step options refuses the file."""
    rt = runtime(rule, OPTIONS[name])
    state = rt.new_state()
    rt.forward(tokens(13), state)
    state.save(tmp_path / "s.safetensors")
    loaded = ar.load_state(tmp_path / "s.safetensors", rt)
    more = tokens(9, seed=4)
    assert_close(rt.forward(more, loaded), rt.forward(more, state), "logits")
    for layer in state.spec.layers:
        if state.S[layer] is not None:
            assert_close(loaded.S[layer], state.S[layer], "state")
    rt.unpatch()
    other = runtime(rule, {})
    with pytest.raises(ar.IncompatibleStateError, match="rule option"):
        ar.load_state(tmp_path / "s.safetensors", other)


REFUSED = [*(pytest.param(rule, name, "overflow", id=f"{rule}-{name}-overflow") for rule, name in INVARIANT_CASES),
           pytest.param("hebbian", "all", "nan", id="hebbian-all-nan"),
           pytest.param("gradient", "delta", "nan", id="gradient-delta-nan")]


@pytest.mark.parametrize("rule,name,poison", REFUSED)
def test_a_non_finite_step_is_refused(rule, name, poison, monkeypatch):
    """A write whose step would be non-finite (NaN inputs, or finite inputs whose product overflows) writes no
    layer; the state is bit-for-bit unchanged and counts the refusal; the next write goes through."""
    rt = runtime(rule, OPTIONS[name], decay=0.9)
    state = rt.new_state()
    rt.forward(tokens(6), state)
    assert state.writes == 1
    before = {i: None if S is None else S.clone() for i, S in state.S.items()}
    write = rt.rule.write

    def bad(chunk):
        writes = write(chunk)
        w = writes[-1]
        V = w.V.clone()
        if poison == "nan":
            V[0, 0] = float("nan")
        else:
            V = V * 1e30
        return [*writes[:-1], Write(w.layer, V, w.X * (1e30 if poison == "overflow" else 1), w.beta, w.steps)]

    monkeypatch.setattr(rt.rule, "write", bad)
    rt.forward(tokens(5, seed=1), state)
    assert state.writes == 1 and state.refused_writes == 1
    for i, S in state.S.items():
        assert (S is None and before[i] is None) or torch.equal(S, before[i]), f"layer {i} changed"
    monkeypatch.undo()
    rt.forward(tokens(5, seed=2), state)
    assert state.writes == 2 and state.refused_writes == 1


# ------------------------------------------------------------------ steps with a state of their own

EXTRA_OPTIONS = {
    "momentum": {"momentum": 0.5},
    "two-scale": {"fast_decay": 0.7, "consolidate": 0.2},
    "both-delta": {"momentum": 0.5, "fast_decay": 0.7, "consolidate": 0.2, "write_form": "delta"},
}
EXTRA_CASES = [pytest.param("gradient", "momentum", id="gradient-momentum"),
               pytest.param("hebbian", "two-scale", id="hebbian-two-scale"),
               pytest.param("gradient", "both-delta", id="gradient-both-delta")]


@pytest.mark.parametrize("bad", [{"momentum": 1.0}, {"momentum": -0.1}, {"fast_decay": 1.5},
                                 {"consolidate": 0.5}, {"fast_decay": 0.5, "consolidate": 2.0}])
def test_bad_extra_step_options_are_clear(bad):
    with pytest.raises(ValueError, match="momentum|fast_decay|consolidate"):
        ar.patch(tiny_model(), rule="gradient", **bad)


def test_momentum_is_heavy_ball_over_chunks(monkeypatch):
    """``M <- mu M + U``, ``S <- decay S + M`` with the rule's own updates (float64 here), chunk by chunk."""
    mu, decay = 0.5, 0.9
    rt = runtime("gradient", {"momentum": mu}, decay=decay)
    seen = record_writes(rt, monkeypatch)
    state = rt.new_state()
    rt.forward(tokens(16), state)  # chunks 0, 1, 2 written
    assert state.writes == 3
    for layer in rt.config.layers:
        M = S = torch.zeros(state.spec.shapes[0], dtype=torch.float64)
        for writes in seen:
            w = next(w for w in writes if w.layer == layer)
            M = mu * M + (w.V.double() * w.beta.double()[:, None]).T @ w.X.double()
            S = decay * S + M
        assert_close(state.extra["momentum"][layer].double(), M, "reference")
        assert_close(state.S[layer].double(), S, "reference")


def test_two_time_scales_fast_part_decays_slow_part_consolidates(monkeypatch):
    """``S' = decay (L + g (S - L)) + U``, ``L' = decay L + c (S' - decay L)`` (float64 here), and the slow part
    keeps a share of an old write after the fast part has forgotten it."""
    g, c, decay = 0.6, 0.25, 0.95
    rt = runtime("hebbian", {"fast_decay": g, "consolidate": c}, decay=decay)
    seen = record_writes(rt, monkeypatch)
    state = rt.new_state()
    rt.forward(tokens(21), state)  # chunks 0..3 written
    assert state.writes == 4
    for layer in rt.config.layers:
        S = L = torch.zeros(state.spec.shapes[0], dtype=torch.float64)
        for writes in seen:
            w = next(w for w in writes if w.layer == layer)
            S = decay * (L + g * (S - L)) + (w.V.double() * w.beta.double()[:, None]).T @ w.X.double()
            L = decay * L + c * (S - decay * L)
        assert_close(state.S[layer].double(), S, "reference")
        assert_close(state.extra["slow"][layer].double(), L, "reference")
        assert L.norm() > 0


def test_norm_bound_scales_the_slow_part_with_S():
    rt = runtime("gradient", {"fast_decay": 0.7, "consolidate": 0.5}, norm_bound=1e-3)
    state = rt.new_state()
    rt.forward(tokens(21), state)
    for layer in rt.config.layers:
        assert float(state.S[layer].norm()) <= 1e-3 * rt._w0_norm[layer] * (1 + 1e-5)
        assert float(state.extra["slow"][layer].norm()) <= float(state.S[layer].norm()) * 1.5


@pytest.mark.parametrize("rule,name", EXTRA_CASES)
def test_extra_steps_causality_and_batching(rule, name):
    rt = runtime(rule, EXTRA_OPTIONS[name], chunk_size=7)
    ids = tokens(30)
    p = 16
    other = ids.clone()
    other[p + 1] = 3 + (int(ids[p + 1]) - 2) % (VOCAB - 3)
    a = rt.forward(ids, rt.new_state())
    b = rt.forward(other, rt.new_state())
    assert_close(a[:, : p + 1], b[:, : p + 1], "prefix")
    assert_close(a[:, : p + 1], rt.forward(ids[: p + 1], rt.new_state()), "prefix")
    prefixes = [tokens(9, seed=1), tokens(16, seed=2), tokens(3, seed=3)]
    nxt = torch.stack([tokens(12, seed=10 + i) for i in range(3)])
    alone = [rt.new_state() for _ in prefixes]
    batched = [rt.new_state() for _ in prefixes]
    for prefix, x, y in zip(prefixes, alone, batched):
        rt.forward(prefix, x)
        rt.forward(prefix, y)
    expected = torch.cat([rt.forward(nxt[i], s) for i, s in enumerate(alone)])
    assert_close(rt.forward(nxt, batched), expected, "logits")
    for x, y in zip(alone, batched):
        assert x.writes == y.writes > 0 and set(x.extra) == set(y.extra) == set(rt.rule.steps.extras)
        for part in x.extra:
            for layer, t in x.extra[part].items():
                assert_close(y.extra[part][layer], t, "state")


@pytest.mark.parametrize("rule,name", EXTRA_CASES)
def test_extra_steps_state_file_carries_their_tensors(rule, name, tmp_path):
    """The momentum and slow part are saved and loaded with S; clone and reset carry them; a file with them is
    refused by a runtime whose steps keep none, and a forged one by the S checks."""
    rt = runtime(rule, EXTRA_OPTIONS[name])
    state = rt.new_state()
    rt.forward(tokens(13), state)
    assert set(state.extra) == set(rt.rule.steps.extras)
    state.save(tmp_path / "s.safetensors")
    loaded = ar.load_state(tmp_path / "s.safetensors", rt)
    fork = state.clone()
    for part in state.extra:
        for layer, t in state.extra[part].items():
            assert torch.equal(loaded.extra[part][layer], t) and torch.equal(fork.extra[part][layer], t)
    more = tokens(11, seed=4)
    assert_close(rt.forward(more, loaded), rt.forward(more, state), "logits")
    assert state.nbytes > rt.new_state().nbytes + sum(t.numel() * 4 for p in state.extra.values() for t in p.values())
    fork.reset()
    assert fork.extra == {}
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "s.safetensors")
    from adapt_runtime.state_file import file_metadata

    meta = file_metadata(tmp_path / "s.safetensors")
    key = next(k for k in tensors if k.startswith(("momentum.", "slow.")))
    forged = dict(tensors)
    forged[key] = forged[key] * float("inf")
    save_file(forged, tmp_path / "forged.safetensors", metadata=meta)
    with pytest.raises(ar.MalformedStateError, match="non-finite"):
        ar.load_state(tmp_path / "forged.safetensors", rt)
    stray = dict(tensors)
    other = "slow" if key.startswith("momentum") else "momentum"
    stray_key = f"{other}.{rt.config.layers[0]}" if other not in rt.rule.steps.extras else f"{other}.99"
    stray[stray_key] = tensors[key].clone()  # a part these steps do not keep, or a layer that is not plastic
    save_file(stray, tmp_path / "stray.safetensors", metadata=meta)
    with pytest.raises(ar.MalformedStateError, match="do not keep"):
        ar.load_state(tmp_path / "stray.safetensors", rt)


@pytest.mark.parametrize("rule,name", EXTRA_CASES)
def test_extra_steps_refuse_a_non_finite_step(rule, name, monkeypatch):
    """A refused write leaves S and the step's own tensors bit for bit as they were."""
    rt = runtime(rule, EXTRA_OPTIONS[name], decay=0.9)
    state = rt.new_state()
    rt.forward(tokens(6), state)
    before = {i: S.clone() for i, S in state.S.items() if S is not None}
    extra = {p: {i: t.clone() for i, t in part.items()} for p, part in state.extra.items()}
    write = rt.rule.write

    def bad(chunk):
        writes = write(chunk)
        w = writes[0]
        return [Write(w.layer, w.V * 1e30, w.X * 1e30, w.beta, w.steps), *writes[1:]]

    monkeypatch.setattr(rt.rule, "write", bad)
    rt.forward(tokens(5, seed=1), state)
    assert state.writes == 1 and state.refused_writes == 1
    assert all(torch.equal(state.S[i], S) for i, S in before.items())
    assert all(torch.equal(state.extra[p][i], t) for p, part in extra.items() for i, t in part.items())


def test_a_rules_step_defaults_yield_to_given_options():
    defaults = {"write_form": "delta", "erase": 0.2}
    assert with_defaults(defaults, {}) == defaults
    assert with_defaults(defaults, {"normalise": 0.01}) == {**defaults, "normalise": 0.01}
    assert with_defaults(defaults, {"erase": 0.3}) == {"write_form": "delta", "erase": 0.3}  # the form stays
    assert with_defaults(defaults, {"write_form": "delta"}) == defaults
    assert with_defaults(defaults, {"write_form": "plain"}) == {"write_form": "plain"}  # no stray erase
    assert runtime("hebbian", {"write_form": "plain"}).rule.steps.plain
    assert ar.patch(tiny_model(), rule="hebbian", erase=0.3).rule.steps.write_form == "delta"


def test_erase_without_the_delta_form_is_refused():
    with pytest.raises(ValueError, match="erase applies to write_form='delta'"):
        ar.patch(tiny_model(), rule="gradient", erase=0.5)


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e10, 1e25], ids=lambda s: f"scale{s:g}")
def test_the_guards_retrieval_norm_bounds_the_exact_norm(scale):
    from adapt_runtime.write import OVERFLOW_GUARD, retrieval_norm

    S = torch.randn(64, 172, generator=torch.Generator().manual_seed(0)) * scale
    exact = torch.linalg.vector_norm(S.double())
    bound = retrieval_norm(S)
    assert bound.dtype == torch.float64 and bound >= exact
    assert (bound <= OVERFLOW_GUARD) == (exact <= OVERFLOW_GUARD)  # the same decision away from the guard
    assert torch.isnan(retrieval_norm(torch.full((2, 2), float("nan"))))
