"""Adapters that cannot seed a session are refused with a clear error: malformed (LoraFormatError) or made for
something else (LoraIncompatibleError)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lora_testing import session, tiny_model
from safetensors.torch import load_file, save_file

import adapt_runtime as ar
from adapt_runtime.lora import LoraFormatError, LoraIncompatibleError
from adapt_runtime.state_file import state_to_bytes

PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(rt, state, folder)``: the bundled model's runtime, a session, and its exact adapter."""
    rt, _, state = session("llama")
    folder = tmp_path_factory.mktemp("good")
    ar.export_lora(rt, state, folder)
    return rt, state, folder


def variant(good: Path, tmp_path: Path, config=None, weights=None, metadata=None) -> Path:
    """A copy of the good adapter with its config dict and/or weights dict changed by the given functions."""
    out = tmp_path / "adapter"
    shutil.copytree(good, out)
    if config is not None:
        data = json.loads((good / "adapter_config.json").read_text())
        result = config(data)
        (out / "adapter_config.json").write_text(json.dumps(result if isinstance(result, dict) else data))
    if weights is not None or metadata is not None:
        tensors = load_file(good / "adapter_model.safetensors")
        result = weights(tensors) if weights is not None else None
        tensors = result if isinstance(result, dict) else tensors
        save_file(tensors, out / "adapter_model.safetensors", metadata=metadata or {"format": "pt"})
    return out


def _set(**values):
    return lambda c: c.update(values)


def _add(key: str, shape: tuple[int, ...]):
    return lambda t: t.update({key: torch.randn(shape)})


def _drop(key: str):
    return lambda t: t.pop(key)


def _scale_nan(t: dict) -> None:
    t[f"{PREFIX}.0.mlp.down_proj.lora_A.weight"][0, 0] = float("nan")


def _factors(value: float, layer: int = 0):
    """Every entry of one layer's lora_A and lora_B set to ``value``: S = (alpha/r) B A has entries r * value^2."""
    def change(t: dict) -> None:
        for factor in "AB":
            t[f"{PREFIX}.{layer}.mlp.down_proj.lora_{factor}.weight"].fill_(value)

    return change


def _wider(t: dict) -> None:
    key = f"{PREFIX}.1.mlp.down_proj.lora_A.weight"
    t[key] = torch.cat([t[key], t[key][:, :4]], dim=1)


INCOMPATIBLE = {
    "another-base-model-name": dict(config=_set(base_model_name_or_path="openai-community/gpt2")),
    "attention-modules": dict(config=_set(target_modules=["q_proj", "down_proj"])),
    "all-linear": dict(config=_set(target_modules="all-linear")),
    "regex-on-the-lm-head": dict(config=_set(target_modules=r".*(down_proj|lm_head)")),
    "dora": dict(config=_set(use_dora=True)),
    "lora-bias": dict(config=_set(lora_bias=True)),
    "trained-bias": dict(config=_set(bias="all")),
    "modules-to-save": dict(config=_set(modules_to_save=["lm_head"])),
    "alpha-pattern": dict(config=_set(alpha_pattern={"down_proj": 3})),
    "not-lora": dict(config=_set(peft_type="IA3")),
    "weights-for-q-proj": dict(weights=_add(f"{PREFIX}.0.self_attn.q_proj.lora_A.weight", (4, 64))),
    "dora-magnitude": dict(weights=_add(f"{PREFIX}.0.mlp.down_proj.lora_magnitude_vector", (64,))),
    "input-width-of-another-model": dict(weights=_wider),
    "another-w0-hash": dict(weights=lambda t: None,
                            metadata={"format": "pt", "adapt_runtime": json.dumps({"w0_sha256": {"2": "0" * 64}})}),
}

MALFORMED = {
    "no-peft-type": dict(config=lambda c: c.pop("peft_type")),
    "rank-zero": dict(config=_set(r=0)),
    "alpha-text": dict(config=_set(lora_alpha="sixteen")),
    "no-target-modules": dict(config=_set(target_modules=None)),
    "target-modules-not-names": dict(config=_set(target_modules=[3])),
    "target-modules-bad-regex": dict(config=_set(target_modules="(down_proj")),
    "rank-differs-from-config": dict(config=lambda c: c.update(r=c["r"] + 1)),
    "missing-lora-b": dict(weights=_drop(f"{PREFIX}.2.mlp.down_proj.lora_B.weight")),
    "not-a-peft-key": dict(weights=_add("model.layers.0.mlp.down_proj.lora_A.weight", (4, 172))),
    "non-finite": dict(weights=_scale_nan),
    "infinite-factor": dict(weights=lambda t: t[f"{PREFIX}.1.mlp.down_proj.lora_B.weight"].fill_(float("inf"))),
    # S = (alpha/r) B A must pass the bound a state import puts on S (state_validation.check_delta)
    "factors-1e19": dict(weights=_factors(1e19)),  # S of r * 1e38: inf in float32
    "factors-1e3": dict(weights=_factors(1e3, layer=4)),  # S of r * 1e6 = 6.4e7: finite, above the 1e5 bound
    "factors-3e38-alpha-1e308": dict(config=_set(lora_alpha=1e308), weights=_factors(3e38)),  # B A * scale: inf
    "alpha-1e308": dict(config=_set(lora_alpha=1e308)),
    "alpha-infinite": dict(config=_set(lora_alpha=float("inf"))),  # json.dumps writes Infinity, json.loads reads it
    "alpha-overflows-a-float": dict(config=_set(lora_alpha=10**400)),
    "rank-infinite": dict(config=_set(r=float("inf"))),
}


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE))
def test_incompatible_adapters_are_refused(exported, tmp_path, case: str) -> None:
    rt, _, good = exported
    with pytest.raises(LoraIncompatibleError):
        ar.import_lora(rt, variant(good, tmp_path, **INCOMPATIBLE[case]))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_adapters_are_refused(exported, tmp_path, case: str) -> None:
    rt, _, good = exported
    with pytest.raises(LoraFormatError):
        ar.import_lora(rt, variant(good, tmp_path, **MALFORMED[case]))


def test_unreadable_files_are_malformed(exported, tmp_path) -> None:
    rt, _, good = exported
    with pytest.raises(LoraFormatError, match="adapter_config.json"):
        ar.import_lora(rt, tmp_path)
    broken = variant(good, tmp_path)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraFormatError, match="JSON"):
        ar.import_lora(rt, broken)
    shutil.copy(good / "adapter_config.json", broken / "adapter_config.json")
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(LoraFormatError, match="safetensors"):
        ar.import_lora(rt, broken)


def test_an_adapter_on_layers_that_are_not_plastic_is_refused(exported) -> None:
    _, _, good = exported
    rt = ar.patch(tiny_model("llama"), rule="hebbian", layers="last:2")
    with pytest.raises(LoraIncompatibleError, match=r"model\.layers\.0\.mlp\.down_proj"):
        ar.import_lora(rt, good)


def test_an_adapter_of_another_model_with_the_same_shapes_is_refused(exported) -> None:
    _, _, good = exported
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.mul_(1.01)  # a fine-tuned sibling: same name and shapes
    with pytest.raises(LoraIncompatibleError, match="model.layers.3.mlp.down_proj differ"):
        ar.import_lora(ar.patch(model, rule="hebbian", layers="all"), good)


def test_an_adapter_on_some_layers_seeds_a_runtime_that_patches_more(exported, tmp_path) -> None:
    rt, _, _ = exported
    top = ar.patch(tiny_model("llama"), rule="hebbian", layers="last:2")
    state = top.new_state()
    top.forward([1, *range(40, 140)], state)
    ar.export_lora(top, state, tmp_path)
    back = ar.import_lora(rt, tmp_path)
    assert [layer for layer, s in back.S.items() if s is not None] == [3, 4]
    for layer in (3, 4):
        torch.testing.assert_close(back.S[layer], state.S[layer], atol=1e-6, rtol=1e-5)


def test_a_subset_of_the_plastic_layers_is_accepted(exported, tmp_path) -> None:
    rt, state, good = exported
    keep = f"{PREFIX}.4.mlp.down_proj"
    only_top = variant(good, tmp_path, config=_set(target_modules=["model.layers.4.mlp.down_proj"]),
                       weights=lambda t: {k: v for k, v in t.items() if k.startswith(keep)})
    back = ar.import_lora(rt, only_top)
    assert [layer for layer, s in back.S.items() if s is not None] == [4]
    torch.testing.assert_close(back.S[4], state.S[4], atol=1e-6, rtol=1e-5)


def test_export_arguments_are_checked(exported, tmp_path) -> None:
    rt, state, _ = exported
    for rank in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            ar.export_lora(rt, state, tmp_path, rank=rank)
    other = ar.patch(tiny_model("llama"), rule="hebbian")
    with pytest.raises(ValueError, match="another runtime"):
        ar.export_lora(other, state, tmp_path)


def test_a_zero_state_exports_a_rank_one_zero_adapter_that_imports_as_zero(exported, tmp_path) -> None:
    rt, _, _ = exported
    info = ar.export_lora(rt, rt.new_state(), tmp_path)
    assert info.rank == 1 and set(info.numerical_rank.values()) == {0}
    assert ar.import_lora(rt, tmp_path).is_zero


def test_an_adapter_just_inside_the_s_bound_imports_and_its_state_loads_again(exported, tmp_path) -> None:
    """What an adapter import acknowledges is what a state import accepts: a session seeded from an adapter can
    always be saved and loaded again (the bound refused a restart's load before import checked it)."""
    rt, _, good = exported
    r = json.loads((good / "adapter_config.json").read_text())["r"]
    inside = variant(good, tmp_path, weights=_factors((0.9e5 / r) ** 0.5, layer=4))
    state = ar.import_lora(rt, inside)
    assert 0.8e5 < float(state.S[4].abs().max()) <= 1e5
    again = ar.state_from_bytes(state_to_bytes(state), rt)
    assert torch.equal(again.S[4], state.S[4])
    shutil.rmtree(inside)
    outside = variant(good, tmp_path, weights=_factors((1.1e5 / r) ** 0.5, layer=4))
    with pytest.raises(LoraFormatError, match=r"model\.layers\.4\.mlp\.down_proj.*bound"):
        ar.import_lora(rt, outside)


@pytest.mark.parametrize("shape", ["list", "object"])
def test_a_deeply_nested_config_is_malformed(exported, tmp_path, shape: str) -> None:
    rt, _, good = exported
    broken = variant(good, tmp_path)
    depth = 100_000
    nested = "[" * depth + "]" * depth if shape == "list" else '{"a":' * depth + "1" + "}" * depth
    (broken / "adapter_config.json").write_text(nested)
    with pytest.raises(LoraFormatError, match="adapter_config.json"):
        ar.import_lora(rt, broken)
    deep_meta = {"format": "pt", "adapt_runtime": '{"w0_sha256":' + "[" * depth + "]" * depth + "}"}
    with pytest.raises(LoraFormatError, match="adapt_runtime"):
        ar.import_lora(rt, variant(good, tmp_path / "meta", weights=lambda t: None, metadata=deep_meta))
