"""Shared pieces of the kernel tests: cases with readable ids, one tolerance table, one closeness check."""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch
from torch import Tensor


class Case(NamedTuple):
    """B sessions, T tokens each, fed in chunks (or prefill segments) of C; S is [N, d, f]; activations dtype."""

    B: int
    T: int
    d: int
    f: int
    C: int
    dtype: torch.dtype


def params(cases: list[Case]) -> list:
    """``pytest.param`` per case with the id ``B{}-T{}-d{}-f{}-C{}-{dtype}``."""
    return [pytest.param(case, id="B{}-T{}-d{}-f{}-C{}-{}".format(*case[:5], str(case.dtype)[6:])) for case in cases]


# relative RMS error bound per activation dtype; float32 on a GPU allows for TF32 tl.dot
RATIO = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GPU_RATIO = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# ``ADAPT_TEST_DEVICE=cuda`` runs the torch-path tests on that device (the interpreter tests stay on the CPU)
DEVICE = os.environ.get("ADAPT_TEST_DEVICE") or "cpu"
TORCH_RATIO = RATIO if DEVICE == "cpu" else {**RATIO, torch.float32: 1e-4}


def needs_device() -> None:
    """Skip when ``ADAPT_TEST_DEVICE`` names a CUDA device this machine does not have."""
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"ADAPT_TEST_DEVICE={DEVICE} but CUDA is not available")


def assert_close(name: str, ref: Tensor, out: Tensor, ratio: float, atol: float = 1e-6) -> None:
    """Same NaN pattern, then max-abs error under ``atol`` or relative RMS error under ``ratio``."""
    ref, out = ref.detach().double().cpu(), out.detach().double().cpu()
    assert torch.equal(ref.isnan(), out.isnan()), f"{name}: NaN pattern differs"
    keep = ~ref.isnan()
    diff = (ref[keep] - out[keep]).flatten()
    if diff.numel() == 0 or diff.abs().max() <= atol:
        return
    rel = diff.square().mean().sqrt() / (ref[keep].square().mean().sqrt() + 1e-12)
    assert rel < ratio, f"{name}: max_abs={diff.abs().max():.3g} rel_rms={rel:.3g}"


def state(n: int, d: int, f: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    """``[n + 1, d, f]`` random state whose last slot is NaN and must never be read or written."""
    S = 0.1 * torch.randn(n + 1, d, f, device=device)
    S[n] = float("nan")
    return S.to(dtype)


def segments(B: int, T: int, C: int, perm: list[int]) -> tuple[Tensor, Tensor]:
    """Prefill layout: session b's T tokens in pieces of C, sessions interleaved piece by piece.

    Returns ``slots [R]`` (session b uses slot ``perm[b]``) and ``offsets [R + 1]`` into the rows, which are
    packed in segment order.
    """
    slots, lengths = [], []
    for start in range(0, T, C):
        for b in range(B):
            slots.append(perm[b])
            lengths.append(min(C, T - start))
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return torch.tensor(slots), offsets
