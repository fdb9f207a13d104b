"""Launch helpers shared by the Triton kernels: interpreter detection, operand dtypes, tile and split
choices.

Imported only by the ``*_triton`` modules, which ``ops`` imports lazily, so importing
``adapt_runtime.kernels`` never imports Triton. Whether Triton compiles or interprets is fixed for the whole
process when Triton is first imported (``TRITON_INTERPRET=1`` then makes every ``@triton.jit`` function,
Triton's own library included, run in the numpy interpreter), so the launchers read it from the kernel
object rather than from the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def interpreted(kernel: object) -> bool:
    """True when ``kernel`` was built by the interpreter (``TRITON_INTERPRET=1`` when Triton was imported)."""
    return isinstance(kernel, InterpretedFunction)


def dot_dtype(*dtypes: torch.dtype, interpret: bool) -> tl.dtype:
    """Operand dtype of ``tl.dot``: bfloat16 when every operand is, float32 otherwise.

    Under the interpreter it is always float32, because its bfloat16 ``tl.dot`` silently returns wrong values.
    On a GPU a float32 ``tl.dot`` runs in TF32 (Triton's default); the accumulator is float32 in every case.
    """
    if not interpret and all(d == torch.bfloat16 for d in dtypes):
        return tl.bfloat16
    return tl.float32


def sm_count(device: torch.device) -> int:
    """SM count of a CUDA device; 1 elsewhere (the interpreter runs one program at a time)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_for(programs: int, f_blocks: int, device: torch.device) -> int:
    """How many pieces to cut the f axis into so that about two programs run per SM (split-K over f)."""
    want = triton.cdiv(2 * sm_count(device), max(programs, 1))
    return max(1, min(want, f_blocks))


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options for one kernel; small on the interpreter, where each program costs ms."""

    block_t: int
    block_d: int
    block_f: int
    num_warps: int


def tiles(kind: str, interpret: bool) -> Tiles:
    """Tiles for ``kind`` in ``decode``, ``prefill``, ``write``, ``fused``, ``scan``."""
    if interpret:
        return Tiles(block_t=16, block_d=32, block_f=32, num_warps=4)
    return {
        "decode": Tiles(block_t=1, block_d=32, block_f=256, num_warps=4),
        "prefill": Tiles(block_t=64, block_d=64, block_f=64, num_warps=4),
        "write": Tiles(block_t=32, block_d=128, block_f=128, num_warps=8),
        "fused": Tiles(block_t=0, block_d=64, block_f=64, num_warps=8),
        "scan": Tiles(block_t=32, block_d=64, block_f=64, num_warps=4),
    }[kind]


def add_partials(y: torch.Tensor, ws: torch.Tensor) -> None:
    """``y += ws`` with one rounding to ``y``'s dtype; ``ws`` holds a split-K launch's fp32 partial sums."""
    y.copy_(y.float().add_(ws))


@triton.jit
def _probe_kernel(x):
    pass


def interpreting() -> bool:
    """True when this process runs Triton kernels in the interpreter."""
    return interpreted(_probe_kernel)
