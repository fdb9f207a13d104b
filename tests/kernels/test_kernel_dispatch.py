"""``impl`` dispatch and validation of the public ops: nothing reaches a kernel with bad slots or shapes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from adapt_runtime.kernels import apply, apply_write, write


def _decode(n: int = 3, dtype: torch.dtype = torch.float32):
    return torch.zeros(2, 8), torch.randn(2, 16), torch.randn(n, 8, 16, dtype=dtype)


def test_import_does_not_import_triton_and_auto_is_torch_on_cpu() -> None:
    code = (
        "import sys, torch\n"
        "from adapt_runtime.kernels import apply\n"
        "y = apply(torch.zeros(2, 8), torch.ones(2, 16), torch.ones(3, 8, 16), torch.tensor([0, 2]))\n"
        "assert float(y.sum()) == 2 * 8 * 16, y\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_impl() -> None:
    y, x, S = _decode()
    with pytest.raises(ValueError, match="impl"):
        apply(y, x, S, torch.tensor([0, 1]), impl="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    y, x, S = _decode()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        apply(y, x, S, torch.tensor([0, 1]), impl="triton")


def test_triton_refuses_unsupported_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y, x, S = _decode(dtype=torch.float64)
    with pytest.raises(TypeError, match="supports state"):
        apply(y.double(), x.double(), S, torch.tensor([0, 1]), impl="triton")
    apply(y.double(), x.double(), S, torch.tensor([0, 1]), impl="auto")  # auto falls back to torch


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_slots_validated_before_launch(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y, x, S = _decode()
    with pytest.raises(IndexError):
        apply(y, x, S, torch.tensor([0, 3]), impl=impl)
    with pytest.raises(IndexError):
        apply(y, x, S, torch.tensor([-1, 0]), impl=impl)
    with pytest.raises(ValueError, match="integer"):
        apply(y, x, S, torch.tensor([0.0, 1.0]), impl=impl)
    with pytest.raises(ValueError, match="one slot per row"):
        apply(y, x, S, torch.tensor([0]), impl=impl)
    with pytest.raises(ValueError, match="non-decreasing"):
        apply(y, x, S, torch.tensor([0, 1]), torch.tensor([0, 3, 2]), impl=impl)
    with pytest.raises(ValueError, match="ending at the number of rows"):
        apply(y, x, S, torch.tensor([0, 1]), torch.tensor([0, 1, 5]), impl=impl)
    V, X = torch.randn(2, 4, 8), torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="distinct"):
        write(S, torch.tensor([1, 1]), V, X, impl=impl)
    with pytest.raises(IndexError):
        write(S, torch.tensor([1, 5]), V, X, impl=impl)
    with pytest.raises(ValueError, match="max_norm"):
        write(S, torch.tensor([0, 1]), V, X, max_norm=torch.ones(3), impl=impl)
    with pytest.raises(IndexError):
        apply_write(torch.zeros(4, 8), X[0], S, 3, V[0], impl=impl)
    with pytest.raises(ValueError, match="beta"):
        apply_write(torch.zeros(4, 8), X[0], S, 0, V[0], torch.ones(5), impl=impl)


def test_devices_must_match() -> None:
    y, x, S = _decode()
    with pytest.raises(ValueError, match="one device"):
        apply(y, x, S.to("meta"), torch.tensor([0, 1]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernel tests compile instead")
def test_interpreter_is_active() -> None:
    """The interpreter tests skip, rather than crash, if Triton was imported compiled; make that a failure."""
    pytest.importorskip("triton")
    from adapt_runtime.kernels import triton_launch

    assert triton_launch.interpreting(), "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET"


def test_triton_refuses_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels write in place behind autograd's back; under autograd only the torch path may run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y, x, S = _decode()
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        apply(y.clone(), x, S, torch.tensor([0, 1]), impl="triton")
    out = apply(y.clone(), x, S, torch.tensor([0, 1]), impl="auto")
    out.sum().backward()
    torch.testing.assert_close(x.grad, S[[0, 1]].sum(1))
