"""Patching: every architecture of the table, the layer selector, unpatch, and clear errors."""

from __future__ import annotations

import pytest
import torch
from core_testing import TINY_CONFIGS, assert_close, tiny_model, tokens

import adapt_runtime as ar
from adapt_runtime.architectures import ARCHITECTURES, get_path
from adapt_runtime.plastic import PlasticDown


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_architecture_is_patched(arch):
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)
    model = tiny_model(arch)
    ids = tokens(12)
    with torch.no_grad():
        base = model(ids[None]).logits.float()
    originals = [get_path(layer, ARCHITECTURES[arch].down) for layer in get_path(model, ARCHITECTURES[arch].layers)]
    rt = ar.patch(model, rule="hebbian", chunk_size=4, lr=4.0)
    assert sum(isinstance(m, PlasticDown) for m in model.modules()) == 3
    fresh = rt.forward(ids, rt.new_state(), adapt=False)
    assert torch.equal(fresh, base)
    state = rt.new_state()
    adapted = rt.forward(ids, state)
    assert state.writes == 2 and not state.is_zero
    assert not torch.allclose(adapted[:, 8:], base[:, 8:])
    rt.unpatch()
    restored = [get_path(layer, ARCHITECTURES[arch].down) for layer in get_path(model, ARCHITECTURES[arch].layers)]
    assert all(a is b for a, b in zip(originals, restored))
    with torch.no_grad():
        assert torch.equal(model(ids[None]).logits.float(), base)


@pytest.mark.parametrize(("spec", "expected"), [
    ("all", (0, 1, 2, 3, 4, 5)), ("last:2", (4, 5)), ("every:2", (0, 2, 4)), ("0,-1", (0, 5)),
    ([-2, 1], (1, 4)), (3, (3,)), ("every:4", (0, 4)),
], ids=str)
def test_layer_selector(spec, expected):
    assert ar.select_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["some", "last:0", "every:x", [7], "9", []], ids=str)
def test_bad_layer_selector(spec):
    with pytest.raises(ValueError):
        ar.select_layers(spec, 6)


def test_patch_twice_fails_clearly():
    model = tiny_model()
    ar.patch(model, rule="hebbian")
    with pytest.raises(ar.AlreadyPatchedError, match="unpatch"):
        ar.patch(model, rule="gradient")


def test_unsupported_architecture_lists_supported():
    class Weird(torch.nn.Module):
        config = type("C", (), {"model_type": "weirdformer"})()

    with pytest.raises(ar.UnsupportedArchitectureError, match="llama"):
        ar.patch(Weird(), rule="hebbian")


def test_selected_layers_only():
    model = tiny_model(layers=4)
    rt = ar.patch(model, rule="gradient", layers="last:2", chunk_size=4, lr=2.0)
    assert rt.config.layers == (2, 3)
    assert [m.index for m in model.modules() if isinstance(m, PlasticDown)] == [2, 3]
    state = rt.new_state()
    rt.forward(tokens(9), state)
    assert set(state.S) == {2, 3} and not state.is_zero


@pytest.mark.parametrize("bad", [{"chunk_size": 0}, {"decay": 1.5}, {"clip": -1.0}, {"lr": -0.1},
                                 {"state_dtype": "int8"}], ids=str)
def test_bad_config_is_clear(bad):
    with pytest.raises(ValueError):
        ar.patch(tiny_model(), rule="hebbian", **bad)


def test_clip_scales_a_write_down_to_the_bound():
    """One write, clipped: the clipped S is the unclipped write scaled to norm ``clip * ||W0||`` exactly."""
    ids = tokens(5)  # chunk 0 complete and labelled: one write
    free = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=50.0)
    clipped = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=50.0, clip=1e-3)
    a, b = free.new_state(), clipped.new_state()
    free.forward(ids, a)
    clipped.forward(ids, b)
    assert a.writes == b.writes == 1
    for layer, wrapper in clipped.plastic.items():
        bound = 1e-3 * float(torch.linalg.vector_norm(wrapper.weight0.detach()))
        norm = float(torch.linalg.vector_norm(a.S[layer]))
        assert norm > 10 * bound, "the clip must be active for this test to mean anything"
        assert_close(b.S[layer], a.S[layer] * (bound / norm), "reference")


def recorded_writes(rt, monkeypatch) -> list[list]:
    """Record every write the rule returns (``V``, ``X``, ``beta`` per layer), in order."""
    log: list[list] = []
    write = rt.rule.write

    def spy(*args, **kwargs):
        writes = write(*args, **kwargs)
        log.append([(w.layer, w.V.double(), w.X.double(), w.beta.double()) for w in writes])
        return writes

    monkeypatch.setattr(rt.rule, "write", spy)
    return log


@pytest.mark.parametrize("decay", [1.0, 0.5, 0.0], ids=lambda d: f"decay{d}")
def test_decay_multiplies_old_writes_at_each_write(decay, monkeypatch):
    """After K writes U_1..U_K, S = sum_k decay^(K-k) U_k, with each U_k = V^T diag(beta) X formed here in float64."""
    # the plain write form (the delta form's erase term is test_rule_steps.py's), no S bound
    rt = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=1.0, decay=decay, norm_bound=0, write_form="plain")
    log = recorded_writes(rt, monkeypatch)
    state = rt.new_state()
    rt.forward(tokens(17), state)
    assert state.writes == len(log) == 4
    for layer in rt.config.layers:
        expected = torch.zeros_like(state.S[layer], dtype=torch.float64)
        for writes in log:
            (V, X, beta), = [(V, X, beta) for i, V, X, beta in writes if i == layer]
            expected = decay * expected + (V * beta[:, None]).T @ X
        assert_close(state.S[layer].double(), expected, "reference")


def test_bfloat16_state_rows_batched_equal_rows_alone():
    """A bfloat16 S: batched rows (the per-row apply) equal rows alone (the merged W0 + S) to float32 accuracy,
    and S follows the float32 run up to bfloat16 rounding."""
    rt = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=4.0, state_dtype="bfloat16")
    ref = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=4.0)
    prefixes = [tokens(9, seed=1), tokens(14, seed=2), tokens(5, seed=3)]
    alone, batched, exact = [rt.new_state() for _ in prefixes], [rt.new_state() for _ in prefixes], []
    for prefix, a, b in zip(prefixes, alone, batched):
        rt.forward(prefix, a)
        rt.forward(prefix, b)
        exact.append(ref.new_state())
        ref.forward(prefix, exact[-1])
    nxt = torch.stack([tokens(6, seed=10 + i) for i in range(3)])
    expected = torch.cat([rt.forward(nxt[i], s) for i, s in enumerate(alone)])
    assert_close(rt.forward(nxt, batched), expected, "logits")
    for a, b, e in zip(alone, batched, exact):
        ref.forward(nxt[exact.index(e)], e)
        assert a.writes == b.writes == e.writes > 0
        for layer in a.spec.layers:
            assert a.S[layer].dtype == torch.bfloat16
            assert_close(b.S[layer], a.S[layer], "bfloat16-state")
            err = torch.linalg.vector_norm(a.S[layer].double() - e.S[layer].double())
            assert err <= 2e-2 * torch.linalg.vector_norm(e.S[layer].double())  # bf16 keeps 8 bits per write
