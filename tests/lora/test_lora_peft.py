"""A session's memory as a PEFT LoRA adapter: PEFT reproduces the runtime, the runtime reproduces PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lora_testing import ARCHS, PROMPT, TEXT, peft_logits, runtime_logits, session, token_ids
from safetensors.torch import load_file

import adapt_runtime as ar

pytest.importorskip("peft")


@pytest.fixture(scope="module", params=ARCHS)
def sessions(request):
    return request.param, *session(request.param)


def test_exported_directory_is_a_peft_lora_on_the_down_projections(sessions, tmp_path) -> None:
    arch, rt, _, state = sessions
    info = ar.export_lora(rt, state, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    down = {"llama": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_proj",
            "opt": "model.decoder.layers.{}.fc2", "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h"}[arch]
    modules = [down.format(i) for i in rt.config.layers]
    assert config["peft_type"] == "LORA" and config["target_modules"] == modules
    assert config["r"] == config["lora_alpha"] == info.rank and config["fan_in_fan_out"] == (arch == "gpt2")
    weights = load_file(tmp_path / "adapter_model.safetensors")
    expected = {f"base_model.model.{m}.lora_{f}.weight" for m in modules for f in "AB"}
    assert set(weights) == expected
    d, f = rt.state_spec.shapes[0]
    assert weights[f"base_model.model.{modules[0]}.lora_A.weight"].shape == (info.rank, f)
    assert weights[f"base_model.model.{modules[0]}.lora_B.weight"].shape == (d, info.rank)


def test_exact_adapter_in_peft_reproduces_the_runtime_logits(sessions, tmp_path) -> None:
    arch, rt, base, state = sessions
    ar.export_lora(rt, state, tmp_path)
    ids = token_ids(arch, PROMPT)
    expected = runtime_logits(rt, state, ids)
    with torch.no_grad():
        static = base(torch.tensor([ids])).logits[0]
    got = peft_logits(base, tmp_path, ids)
    assert (expected - static).abs().max() > 1e-2  # the memory changes the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_round_trip_export_import_is_exact_at_full_rank(sessions, tmp_path) -> None:
    """At full rank (every layer's numerical rank is min(d, f) here) the adapter is ``B = I, A = S``: the round trip
    gives S bit for bit, and so the same logits. (SVD factors rounded to float32 changed ~40% of S's entries in the
    last place, and the logits by up to ~1.3e-5 at logits of ~15: over atol + rtol * |x| = 1e-5 for a logit near 0,
    whose float error follows the row's scale, not its own value.)"""
    arch, rt, _, state = sessions
    info = ar.export_lora(rt, state, tmp_path)
    assert info.rank == min(rt.state_spec.shapes[0]) and set(info.rel_error.values()) == {0.0}
    back = ar.import_lora(rt, tmp_path)
    for layer, S in state.S.items():
        assert torch.equal(back.S[layer], S), layer
    assert back.tokens_seen == 0 and back.kv is None
    ids = token_ids(arch, PROMPT)
    assert torch.equal(runtime_logits(rt, back, ids), runtime_logits(rt, state, ids))


def test_round_trip_below_full_rank_is_within_float32_rounding_of_the_factors(tmp_path) -> None:
    """A state of numerical rank k < min(d, f) is written as its SVD factors in float32, and the round trip is exact
    up to the rounding that derives this bound, with u = eps32 / 2 the unit roundoff and s_1 <= ||S||_F:
      * singular values left out: each <= s_1 * eps32, at most n - k of them: ||.||_F <= sqrt(n - k) * eps32 * s_1;
      * B = U_k sqrt(s), A = sqrt(s) V_k^T rounded entrywise: ||dB||_F <= u ||B||_F = u sqrt(sum s_i), and
        ||dB A||_F <= ||dB||_F ||A||_2 <= u sqrt(k s_1) sqrt(s_1); the same for B dA: in all
        2 u sqrt(k) s_1 = eps32 sqrt(k) s_1;
      * B A in float64 (negligible), then rounded to float32: u ||S||_F.
    So ||S' - S||_F <= eps32 (sqrt(n - k) + sqrt(k) + 1/2) ||S||_F (first order; the float64 SVD adds ~1e-15)."""
    rt, _, _ = session("llama")
    state = rt.new_state()
    rt.forward(token_ids("llama", TEXT, n=40), state)
    info = ar.export_lora(rt, state, tmp_path)
    n = min(rt.state_spec.shapes[0])
    assert 0 < info.rank < n and state.writes >= 1
    back = ar.import_lora(rt, tmp_path)
    eps = torch.finfo(torch.float32).eps
    for layer, S in state.S.items():
        k = info.numerical_rank[layer]
        bound = eps * ((n - k) ** 0.5 + k**0.5 + 0.5)
        rel = float(torch.linalg.matrix_norm((back.S[layer] - S).double()) / torch.linalg.matrix_norm(S.double()))
        assert rel <= bound, (layer, k, rel, bound)


def test_rank_r_error_decreases_with_the_rank(tmp_path) -> None:
    rt, base, state = session("llama")
    ids = token_ids("llama", PROMPT)
    expected = runtime_logits(rt, state, ids)
    logit_err, weight_err = [], []
    full = min(min(S.shape) for S in state.S.values())  # the rank at which the truncated SVD is exact
    for r in (1, 4, 16, 32, full):
        info = ar.export_lora(rt, state, tmp_path / str(r), rank=r)
        weights = load_file(tmp_path / str(r) / "adapter_model.safetensors")
        assert info.rank == r
        for layer, S in state.S.items():  # the recorded error is the factors' actual error
            name = f"base_model.model.model.layers.{layer}.mlp.down_proj"
            approx = weights[f"{name}.lora_B.weight"].double() @ weights[f"{name}.lora_A.weight"].double()
            actual = float(torch.linalg.matrix_norm(approx - S.double()) / torch.linalg.matrix_norm(S.double()))
            assert info.rel_error[layer] == pytest.approx(actual, rel=1e-4, abs=1e-6)
        weight_err.append(max(info.rel_error.values()))
        logit_err.append(float((peft_logits(base, tmp_path / str(r), ids) - expected).abs().max()))
    assert weight_err == sorted(weight_err, reverse=True) and weight_err[-1] < 1e-5 and weight_err[0] > 0.05
    assert logit_err == sorted(logit_err, reverse=True) and logit_err[-1] < 0.1 * logit_err[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_made_adapter_imports_to_the_same_logits(arch: str, rslora: bool, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    rt, base, _ = session(arch)
    target = "down_proj" if arch == "llama" else "mlp.c_proj"
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=[target],
                                                                 init_lora_weights=False, use_rslora=rslora))
    with torch.no_grad():  # PEFT's random init of lora_B is small; make the adapter matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(30.0 if arch == "llama" else 3.0)
    peft_model.save_pretrained(tmp_path)
    ids = token_ids(arch, PROMPT)
    with torch.no_grad():
        expected = peft_model(torch.tensor([ids])).logits[0]
        static = base(torch.tensor([ids])).logits[0]
    state = ar.import_lora(rt, tmp_path)
    got = rt.forward(ids, state, adapt=False)[0]
    assert (expected - static).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
