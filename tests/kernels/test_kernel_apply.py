"""``apply`` against its naive twin: Triton under the interpreter, the torch path, and Triton on CUDA."""

from __future__ import annotations

import pytest
import torch
from adapt_runtime.kernels import apply
from adapt_runtime.kernels.naive import apply_naive
from kernel_testing import (
    DEVICE,
    GPU_RATIO,
    RATIO,
    TORCH_RATIO,
    Case,
    assert_close,
    needs_device,
    params,
    segments,
    state,
)

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

CPU_CASES = [
    Case(5, 1, 40, 72, 1, f32),  # decode
    Case(3, 1, 40, 72, 1, f16),
    Case(3, 1, 130, 520, 1, f32),  # slots large enough for the torch path's per-row loop
    Case(2, 7, 40, 72, 7, f32),  # prefill, one segment per session
    Case(3, 63, 40, 72, 32, f16),  # two segments per session, interleaved
    Case(1, 63, 24, 200, 63, f32),
]
GPU_CASES = [
    Case(64, 1, 512, 1000, 1, bf16),
    Case(8, 1, 2048, 8192, 1, bf16),
    Case(8, 200, 512, 1000, 64, bf16),
    Case(4, 63, 300, 700, 63, f16),
    Case(8, 100, 512, 1000, 100, f32),
]


def _inputs(case: Case, state_dtype: torch.dtype = f32, device: str = "cpu"):
    B, T, d, f, C, dtype = case
    S = state(B, d, f, state_dtype, device)
    perm = list(reversed(range(B)))
    if T == 1:
        slots, offsets = torch.tensor(perm, device=device), None
    else:
        slots, offsets = (t.to(device) for t in segments(B, T, C, perm))
    x = torch.randn(B * T, f, device=device).to(dtype)
    y = torch.randn(B * T, d, device=device).to(dtype)
    return y, x, S, slots, offsets


def _check(case: Case, impl: str, ratio: dict, state_dtype: torch.dtype = f32, device: str = "cpu") -> None:
    torch.manual_seed(0)
    y, x, S, slots, offsets = _inputs(case, state_dtype, device)
    ref = apply_naive(y.clone(), x, S, slots, offsets)
    out = apply(y.clone(), x, S, slots, offsets, impl=impl)
    assert_close("y", ref, out, ratio[case.dtype])


@pytest.mark.parametrize("case", params(CPU_CASES))
def test_apply_triton(case: Case, interpreter: None) -> None:
    _check(case, "triton", RATIO)


@pytest.mark.parametrize("case", params(CPU_CASES))
def test_apply_torch(case: Case) -> None:
    needs_device()
    _check(case, "torch", TORCH_RATIO, device=DEVICE)


@pytest.mark.parametrize("case", params([c for c in CPU_CASES if c.dtype == f32]))
def test_apply_torch_bf16_state_accumulates_in_float32(case: Case) -> None:
    """A bfloat16 S is read exactly and the products summed in float32: as close to the float64 twin as a float32
    S is (x is never rounded to bfloat16)."""
    needs_device()
    _check(case, "torch", TORCH_RATIO, state_dtype=bf16, device=DEVICE)


def test_apply_triton_bf16_state(interpreter: None) -> None:
    _check(Case(3, 7, 40, 72, 4, f32), "triton", {f32: 2e-3}, state_dtype=bf16)


@pytest.mark.parametrize("case", params([Case(3, 1, 40, 72, 1, f32), Case(2, 33, 40, 100, 16, f32)]))
def test_apply_triton_split_f(case: Case, interpreter: None) -> None:
    """f split over programs, partial sums added with atomics into a workspace."""
    from adapt_runtime.kernels.apply_triton import apply_triton

    torch.manual_seed(0)
    y, x, S, slots, offsets = _inputs(case)
    ref = apply_naive(y.clone(), x, S, slots, offsets)
    out = apply_triton(y.clone(), x, S, slots, offsets, split=3)
    assert_close("y", ref, out, RATIO[f32])


def test_apply_triton_shared_slots_and_empty_segments(interpreter: None) -> None:
    torch.manual_seed(0)
    S = state(2, 40, 72)
    x, y = torch.randn(9, 72), torch.randn(9, 40)
    for slots, offsets in [(torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1]), None),
                           (torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 4, 4, 9]))]:
        ref = apply_naive(y.clone(), x, S, slots, offsets)
        assert_close("y", ref, apply(y.clone(), x, S, slots, offsets, impl="triton"), RATIO[f32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", params(GPU_CASES))
@pytest.mark.parametrize("state_dtype", [f32, bf16], ids=["Sfloat32", "Sbfloat16"])
def test_apply_cuda(case: Case, state_dtype: torch.dtype) -> None:
    ratio = GPU_RATIO if state_dtype == f32 else {k: max(v, 2e-2) for k, v in GPU_RATIO.items()}
    _check(case, "auto", ratio, state_dtype, "cuda")


@pytest.mark.parametrize("threads", [1, 2, 3], ids=lambda n: f"{n}-threads")
@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
def test_apply_torch_decode_rows_shared_by_threads(threads: int, inference: bool) -> None:
    """Large slots at decode: the rows' products are split over one thread per torch thread; every row is added
    once, in the caller's inference mode (thread-local), as the twin says."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        with torch.inference_mode(inference):
            y, x, S, slots, _ = _inputs(Case(5, 1, 130, 520, 1, f32))
            slots = torch.tensor([3, 0, 3, 4, 1])  # a slot read by two rows
            ref = apply_naive(y.clone(), x, S, slots)
            out = apply(y.clone(), x, S, slots, impl="torch")
        assert out.is_inference() == inference
        assert_close("y", ref, out, TORCH_RATIO[f32])
    finally:
        torch.set_num_threads(before)
