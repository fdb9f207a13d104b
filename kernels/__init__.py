"""Fast-weight ops: ``apply``, ``write`` and the fused ``apply_write``, each with
``impl="auto"|"torch"|"triton"``.

Every implementation has a naive twin in :mod:`adapt_runtime.kernels.naive` with the same signature and
layout.
"""

from adapt_runtime.kernels.ops import apply, apply_write, write

__all__ = ["apply", "apply_write", "write"]
