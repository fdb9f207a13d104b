"""``write`` against its naive twin over a stream of chunks: decay, beta, Frobenius clip, refused writes, and the
delta form (``erase``: targets less what the old S retrieves)."""

from __future__ import annotations

import pytest
import torch
from adapt_runtime.kernels import write
from adapt_runtime.kernels.naive import write_naive
from kernel_testing import DEVICE, GPU_RATIO, RATIO, TORCH_RATIO, Case, assert_close, needs_device, params, state

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

CPU_CASES = [
    Case(1, 1, 40, 72, 1, f32),
    Case(3, 7, 40, 72, 7, f16),
    Case(2, 63, 40, 72, 16, f32),
    Case(3, 63, 24, 136, 32, f16),
]
GPU_CASES = [
    Case(8, 128, 512, 1000, 64, bf16),
    Case(4, 512, 300, 700, 512, bf16),
    Case(2, 2048, 2048, 8192, 2048, bf16),
    Case(4, 63, 300, 700, 63, f16),
    Case(4, 200, 512, 1000, 100, f32),
]


def _stream(case: Case, impl: str, ratio: float, state_dtype: torch.dtype = f32, device: str = "cpu",
            erase: float = 0.0) -> None:
    """B sessions write T tokens in chunks of C; rows are clipped to half the first chunk's norm, decay 0.9;
    ``erase``: the delta form."""
    torch.manual_seed(0)
    B, T, d, f, C, dtype = case
    S_ref = state(B + 1, d, f, state_dtype, device)  # slot B: never written, slot B + 1: NaN
    S_out = S_ref.clone()
    slots = torch.tensor(list(reversed(range(B))), device=device)
    V = torch.randn(B, T, d, device=device).to(dtype)
    X = torch.randn(B, T, f, device=device).to(dtype)
    beta = torch.rand(B, T, device=device)
    max_norm = None
    for start in range(0, T, C):
        chunk = slice(start, start + C)
        ref = write_naive(S_ref, slots, V[:, chunk], X[:, chunk], beta[:, chunk], 0.9, max_norm, erase)
        out = write(S_out, slots, V[:, chunk], X[:, chunk], beta[:, chunk], 0.9, max_norm, erase, impl=impl)
        assert_close("norms", ref, out, ratio)
        if max_norm is None:  # clip from the second chunk on, every other row
            max_norm = torch.where(torch.arange(B, device=device) % 2 == 0, 0.5 * ref, 1e9)
    assert_close("S", S_ref, S_out, ratio)
    assert torch.equal(S_out[B], S_ref[B]), "a slot outside the write changed"


@pytest.mark.parametrize("case", params(CPU_CASES))
def test_write_triton(case: Case, interpreter: None) -> None:
    _stream(case, "triton", RATIO[case.dtype])


@pytest.mark.parametrize("case", params(CPU_CASES))
def test_write_torch(case: Case) -> None:
    needs_device()
    _stream(case, "torch", TORCH_RATIO[case.dtype], device=DEVICE)


def test_write_triton_bf16_state(interpreter: None) -> None:
    _stream(Case(2, 20, 40, 72, 10, f32), "triton", 1e-2, state_dtype=bf16)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_write_refuses_non_finite(impl: str, request: pytest.FixtureRequest) -> None:
    """A row with a non-finite write leaves its slot bit-for-bit untouched; the others are written."""
    if impl == "triton":
        request.getfixturevalue("interpreter")
    torch.manual_seed(0)
    S = state(3, 40, 72)
    V, X = torch.randn(3, 5, 40), torch.randn(3, 5, 72)
    V[0, 2, 7] = float("inf")
    X[2, 4, 1] = float("nan")
    before = S.clone()
    ref = write_naive(before.clone(), torch.tensor([0, 1, 2]), V, X, None, 0.5)
    norms = write(S, torch.tensor([0, 1, 2]), V, X, None, 0.5, impl=impl)
    assert not norms[0].isfinite() and not norms[2].isfinite() and norms[1].isfinite()
    assert torch.equal(S[0], before[0]) and torch.equal(S[2], before[2])
    assert_close("norm", ref[1], norms[1], RATIO[f32])
    assert not torch.equal(S[1], before[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", params(GPU_CASES))
@pytest.mark.parametrize("state_dtype", [f32, bf16], ids=["Sfloat32", "Sbfloat16"])
def test_write_cuda(case: Case, state_dtype: torch.dtype) -> None:
    ratio = GPU_RATIO[case.dtype] if state_dtype == f32 else 2e-2
    _stream(case, "auto", ratio, state_dtype, "cuda")


@pytest.mark.parametrize("state_dtype", [f32, bf16], ids=["f32-state", "bf16-state"])
@pytest.mark.parametrize("gram", [True, False], ids=["gram-norm", "formed-update"])
def test_write_torch_norm_paths_agree_with_the_twin(gram: bool, state_dtype: torch.dtype,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of taking the write's norm (chosen by shape in ``gram_norm_pays``) write what the twin writes."""
    from adapt_runtime.kernels import torch_ops

    monkeypatch.setattr(torch_ops, "gram_norm_pays", lambda C, d, f: gram)
    _stream(Case(3, 24, 40, 72, 8, f32), "torch", TORCH_RATIO[f32] if state_dtype == f32 else 2e-3,
            state_dtype=state_dtype)


DELTA_CASES = [Case(1, 9, 40, 72, 9, f32), Case(3, 40, 24, 136, 20, f32), Case(2, 21, 40, 72, 7, f16)]


@pytest.mark.parametrize("case", params(DELTA_CASES))
@pytest.mark.parametrize("erase", [1.0, 0.45])
def test_write_delta_triton(case: Case, erase: float, interpreter: None) -> None:
    _stream(case, "triton", RATIO[case.dtype], erase=erase)


@pytest.mark.parametrize("case", params(DELTA_CASES))
@pytest.mark.parametrize("gram", [True, False], ids=["gram-norm", "formed-update"])
def test_write_delta_torch(case: Case, gram: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapt_runtime.kernels import torch_ops

    needs_device()
    monkeypatch.setattr(torch_ops, "gram_norm_pays", lambda C, d, f: gram)
    _stream(case, "torch", TORCH_RATIO[case.dtype], device=DEVICE, erase=1.0)


def test_write_delta_triton_bf16_state(interpreter: None) -> None:
    _stream(Case(2, 20, 40, 72, 10, f32), "triton", 1e-2, state_dtype=bf16, erase=1.0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_write_delta_is_the_delta_rule(impl: str, request: pytest.FixtureRequest) -> None:
    """The delta form with one key of unit norm and rate 1 stores exactly ``v`` at that key (what S retrieved there
    before is replaced, not added to), and leaves directions orthogonal to the key alone."""
    if impl == "triton":
        request.getfixturevalue("interpreter")
    torch.manual_seed(0)
    S = state(1, 40, 72)
    x = torch.randn(72)
    x = x / x.norm()
    v = torch.randn(40)
    other = torch.randn(72)
    other = other - (other @ x) * x
    before = S[0].clone()
    write(S, torch.tensor([0]), v[None, None], x[None, None], torch.ones(1, 1), 1.0, None, 1.0, impl=impl)
    torch.testing.assert_close(S[0] @ x, v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S[0] @ other, before @ other, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy matmul
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_write_delta_refuses_non_finite(impl: str, request: pytest.FixtureRequest) -> None:
    """The delta form refuses a row with non-finite inputs as the plain form does: its slot stays bit for bit."""
    if impl == "triton":
        request.getfixturevalue("interpreter")
    torch.manual_seed(0)
    S = state(2, 40, 72)
    V, X = torch.randn(2, 5, 40), torch.randn(2, 5, 72)
    X[1, 3, 2] = float("inf")
    before = S.clone()
    ref = write_naive(before.clone(), torch.tensor([0, 1]), V, X, None, 0.9, None, 1.0)
    norms = write(S, torch.tensor([0, 1]), V, X, None, 0.9, None, 1.0, impl=impl)
    assert norms[0].isfinite() and not norms[1].isfinite()
    assert torch.equal(S[1], before[1])
    assert_close("norm", ref[0], norms[0], RATIO[f32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", params([c for c in GPU_CASES if c.T <= 512]))
def test_write_delta_cuda(case: Case) -> None:
    _stream(case, "auto", GPU_RATIO[case.dtype], device="cuda", erase=1.0)
