"""A rank-r state (``state_rank``) as a LoRA adapter: its factors are the adapter (no SVD), PEFT reproduces the
session, and the adapter comes back as the same factors (or as S = B A in a dense runtime)."""

from __future__ import annotations

import json

import pytest
import torch
from lora_testing import PROMPT, peft_logits, runtime_logits, session, token_ids
from safetensors.torch import load_file, save_file

import adapt_runtime as ar

pytest.importorskip("peft")

RANK = 16
B_KEY = "base_model.model.model.layers.{}.mlp.down_proj.lora_B.weight"
A_KEY = "base_model.model.model.layers.{}.mlp.down_proj.lora_A.weight"


@pytest.fixture(scope="module")
def low():
    """``(rt, base, state)``: the bundled model at state_rank 16 after reading the text (every layer at rank 16)."""
    rt, base, state = session("llama", state_rank=RANK)
    assert {pair[0].shape[1] for pair in state.factors.values()} == {RANK}
    return rt, base, state


def dense_runtime() -> ar.Runtime:
    return ar.patch(ar.load_model("llama")[0], rule="hebbian", layers="all")


def test_the_adapter_is_the_factors_bit_for_bit(low, tmp_path) -> None:
    rt, _, state = low
    info = ar.export_lora(rt, state, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert info.rank == config["r"] == config["lora_alpha"] == RANK  # scaling 1
    assert set(info.rel_error.values()) == {0.0}
    assert all(0 < k <= RANK for k in info.numerical_rank.values())
    weights = load_file(tmp_path / "adapter_model.safetensors")
    for layer, (B, A) in state.factors.items():
        assert torch.equal(weights[B_KEY.format(layer)], B) and torch.equal(weights[A_KEY.format(layer)], A)


def test_peft_with_the_adapter_reproduces_the_session(low, tmp_path) -> None:
    rt, base, state = low
    ar.export_lora(rt, state, tmp_path)
    ids = token_ids("llama", PROMPT)
    expected = runtime_logits(rt, state, ids)
    with torch.no_grad():
        static = base(torch.tensor([ids])).logits[0]
    assert (expected - static).abs().max() > 1e-2  # the memory changes the logits
    torch.testing.assert_close(peft_logits(base, tmp_path, ids), expected, atol=1e-4, rtol=1e-4)


def test_import_into_a_rank_r_runtime_gives_the_factors_back(low, tmp_path) -> None:
    rt, _, state = low
    ar.export_lora(rt, state, tmp_path)
    back = ar.import_lora(rt, tmp_path)
    assert set(back.factors) == set(state.factors) and all(s is None for s in back.S.values())
    for layer, (B, A) in state.factors.items():
        assert torch.equal(back.factors[layer][0], B) and torch.equal(back.factors[layer][1], A)
    ids = token_ids("llama", PROMPT)
    assert torch.equal(runtime_logits(rt, back, ids), runtime_logits(rt, state, ids))
    ar.state_from_bytes(back.to_bytes(), rt)  # a seeded session saves and loads


def test_import_into_a_dense_runtime_is_s_equal_b_a(low, tmp_path) -> None:
    rt, _, state = low
    ar.export_lora(rt, state, tmp_path)
    dense = dense_runtime()
    back = ar.import_lora(dense, tmp_path)
    assert back.factors == {}
    for layer, (B, A) in state.factors.items():
        torch.testing.assert_close(back.S[layer], B @ A, atol=1e-6, rtol=1e-5)
    ids = token_ids("llama", PROMPT)
    torch.testing.assert_close(runtime_logits(dense, back, ids), runtime_logits(rt, state, ids), atol=1e-4,
                               rtol=1e-4)


def test_a_lower_rank_is_the_best_approximation_of_b_a(low, tmp_path) -> None:
    rt, _, state = low
    info = ar.export_lora(rt, state, tmp_path, rank=4)
    assert info.rank == 4
    weights = load_file(tmp_path / "adapter_model.safetensors")
    for layer, (B, A) in state.factors.items():
        S = (B @ A).double()
        u, s, vh = torch.linalg.svd(S, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        got = (weights[B_KEY.format(layer)] @ weights[A_KEY.format(layer)]).double()
        torch.testing.assert_close(got, best, atol=1e-5 * float(s[0]), rtol=0)
        expected = float((s[4:].pow(2).sum() / s.pow(2).sum()).sqrt())
        assert info.rel_error[layer] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    back = ar.import_lora(rt, tmp_path)
    assert {pair[0].shape[1] for pair in back.factors.values()} == {4}


def test_an_adapter_above_the_runtime_rank_is_refused_and_one_within_it_is_factors(low, tmp_path) -> None:
    rt, _, _ = low
    dense = dense_runtime()
    state = dense.new_state()
    dense.forward(token_ids("llama", PROMPT * 4), state)
    ar.export_lora(dense, state, tmp_path / "full")  # numerical rank above 16
    with pytest.raises(ar.LoraIncompatibleError, match="rank"):
        ar.import_lora(rt, tmp_path / "full")
    info = ar.export_lora(dense, state, tmp_path / "eight", rank=8)
    back = ar.import_lora(rt, tmp_path / "eight")
    weights = load_file(tmp_path / "eight" / "adapter_model.safetensors")
    for layer in rt.config.layers:
        B, A = back.factors[layer]
        assert B.shape[1] <= info.rank == 8
        torch.testing.assert_close(B @ A, weights[B_KEY.format(layer)] @ weights[A_KEY.format(layer)])


def test_a_zero_state_exports_a_zero_adapter_that_imports_as_no_factors(low, tmp_path) -> None:
    rt, _, _ = low
    info = ar.export_lora(rt, rt.new_state(), tmp_path)
    assert info.rank == 1 and set(info.numerical_rank.values()) == {0}
    back = ar.import_lora(rt, tmp_path)
    assert back.factors == {} and back.is_zero


@pytest.mark.parametrize("forgery", ["huge", "nan"])
def test_forged_factors_are_refused(low, tmp_path, forgery) -> None:
    rt, _, state = low
    ar.export_lora(rt, state, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    weights = load_file(path)
    key = B_KEY.format(rt.config.layers[0])
    weights[key] = weights[key] * 1e9 if forgery == "huge" else weights[key].fill_(float("nan"))
    save_file(weights, path)
    with pytest.raises(ar.LoraFormatError):
        ar.import_lora(rt, tmp_path)
