"""Fused ``apply_write`` against its naive twin: sessions read a stream chunk by chunk, apply then write."""

from __future__ import annotations

import pytest
import torch
from adapt_runtime.kernels import apply_write
from adapt_runtime.kernels.naive import apply_write_naive
from kernel_testing import DEVICE, GPU_RATIO, RATIO, TORCH_RATIO, Case, assert_close, needs_device, params, state

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

CPU_CASES = [
    Case(1, 1, 40, 72, 1, f32),
    Case(2, 7, 40, 72, 7, f16),
    Case(2, 63, 40, 72, 16, f32),
    Case(1, 63, 24, 136, 63, f16),
    Case(1, 130, 24, 40, 130, f32),  # longer than the fused kernel takes: apply, then write
]
GPU_CASES = [
    Case(2, 256, 512, 1000, 64, bf16),
    Case(1, 128, 2048, 8192, 128, bf16),
    Case(1, 512, 2048, 8192, 512, bf16),
    Case(2, 63, 300, 700, 63, f16),
    Case(2, 200, 512, 1000, 100, f32),
]


def _stream(case: Case, impl: str, ratio: float, state_dtype: torch.dtype = f32, device: str = "cpu",
            **options) -> None:
    """B sessions (slots B-1..0) take turns on chunks of C tokens; decay 0.8, beta, clip on every other chunk."""
    torch.manual_seed(0)
    B, T, d, f, C, dtype = case
    S_ref = state(B, d, f, state_dtype, device)
    S_out = S_ref.clone()
    x = torch.randn(B, T, f, device=device).to(dtype)
    y = torch.randn(B, T, d, device=device).to(dtype)
    V = torch.randn(B, T, d, device=device).to(dtype)
    beta = torch.rand(B, T, device=device)
    y_ref, y_out = y.clone(), y.clone()
    for k, start in enumerate(range(0, T, C)):
        chunk = slice(start, start + C)
        for b in range(B):
            max_norm = 1.0 if k % 2 else None
            args = (x[b, chunk], None, B - 1 - b, V[b, chunk], beta[b, chunk], 0.8, max_norm)
            ref = apply_write_naive(y_ref[b, chunk], *(args[0], S_ref, *args[2:]))
            out = apply_write(y_out[b, chunk], *(args[0], S_out, *args[2:]), impl=impl, **options)
            assert_close("norm", ref, out, ratio)
    assert_close("y", y_ref, y_out, ratio)
    assert_close("S", S_ref, S_out, ratio)


@pytest.mark.parametrize("case", params(CPU_CASES))
def test_apply_write_triton(case: Case, interpreter: None) -> None:
    _stream(case, "triton", RATIO[case.dtype])


@pytest.mark.parametrize("case", params(CPU_CASES))
def test_apply_write_torch(case: Case) -> None:
    needs_device()
    _stream(case, "torch", TORCH_RATIO[case.dtype], device=DEVICE)


def test_apply_write_triton_split_f(interpreter: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs of an S stripe split over programs along f, summed with atomics."""
    from adapt_runtime.kernels import apply_write_triton

    launch = apply_write_triton.apply_write_triton
    monkeypatch.setattr(apply_write_triton, "apply_write_triton", lambda *a, **k: launch(*a, **k, split=3))
    _stream(Case(1, 20, 40, 100, 10, f32), "triton", RATIO[f32])


def test_apply_write_triton_bf16_state(interpreter: None) -> None:
    _stream(Case(1, 20, 40, 72, 10, f32), "triton", 1e-2, state_dtype=bf16)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_apply_write_refuses_non_finite(impl: str, request: pytest.FixtureRequest) -> None:
    """A non-finite write leaves S untouched; the outputs still come from the old S."""
    if impl == "triton":
        request.getfixturevalue("interpreter")
    torch.manual_seed(0)
    S = state(1, 40, 72)
    x, y, V = torch.randn(6, 72), torch.randn(6, 40), torch.randn(6, 40)
    V[3, 5] = float("nan")
    before = S.clone()
    y_ref = y.clone()
    apply_write_naive(y_ref, x, before.clone(), 0, V)
    norm = apply_write(y, x, S, 0, V, impl=impl)
    assert not norm.isfinite()
    assert torch.equal(S[:1], before[:1])
    assert_close("y", y_ref, y, RATIO[f32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", params(GPU_CASES))
@pytest.mark.parametrize("state_dtype", [f32, bf16], ids=["Sfloat32", "Sbfloat16"])
def test_apply_write_cuda(case: Case, state_dtype: torch.dtype) -> None:
    ratio = GPU_RATIO[case.dtype] if state_dtype == f32 else 2e-2
    _stream(case, "auto", ratio, state_dtype, "cuda")
