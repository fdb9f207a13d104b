"""Patching: every architecture of the table, the layer selector, unpatch, and clear errors."""

from __future__ import annotations

import pytest
import torch
from core_testing import TINY_CONFIGS, tiny_model, tokens

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


def test_clip_bounds_each_write():
    rt = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=50.0, clip=1e-3)
    state = rt.new_state()
    rt.forward(tokens(5), state)
    for layer, wrapper in rt.plastic.items():
        bound = 1e-3 * float(wrapper.weight0.detach().norm())
        assert float(state.S[layer].norm()) <= bound * (1 + 1e-4)


def test_decay_shrinks_old_writes():
    kept = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=1.0, decay=1.0)
    decayed = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=1.0, decay=0.5)
    a, b = kept.new_state(), decayed.new_state()
    ids = tokens(30)
    kept.forward(ids, a)
    decayed.forward(ids, b)
    assert sum(b.delta_norms().values()) < sum(a.delta_norms().values())


def test_bfloat16_state_dtype():
    rt = ar.patch(tiny_model(), rule="hebbian", chunk_size=4, lr=4.0, state_dtype="bfloat16")
    state = rt.new_state()
    rt.forward(tokens(9), state)
    assert all(s.dtype == torch.bfloat16 for s in state.S.values())
