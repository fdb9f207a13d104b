"""Kernel tests: the Triton kernels run on CPU tensors under the Triton interpreter.

``TRITON_INTERPRET`` is read once, when Triton is first imported: it decides whether every ``@triton.jit``
function, Triton's own library included, compiles or runs in the interpreter. So it is set here, at import, and
the kernel modules are imported right away. On a machine with CUDA it is left alone, so the GPU tests compile;
the interpreter tests then skip. The variable is removed again after the imports and set only while a kernel test
runs, so it does not leak into the rest of the suite or into the processes other tests start.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_SET_HERE = False
if "triton" not in sys.modules and not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    _SET_HERE = True
try:
    import triton.experimental.gluon  # noqa: F401  (imported lazily by Triton at launch; needs the variable)
    from adapt_runtime.kernels import (  # noqa: F401
        apply_triton,
        apply_write_triton,
        chunk_scan_triton,
        triton_launch,
        write_triton,
    )

    INTERPRETING = triton_launch.interpreting()
except ImportError:
    INTERPRETING = False
finally:
    if _SET_HERE:
        del os.environ["TRITON_INTERPRET"]


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test's Triton launches on CPU tensors in the interpreter (skip if Triton was compiled instead)."""
    if not INTERPRETING:
        pytest.skip("Triton kernels are compiled in this process; run tests/kernels alone for the interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill every floating ``torch.empty``/``empty_like`` with NaN, so output never written shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def wrapper(*args, **kwargs):
            out = make(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
