"""Public fast-weight ops with validation and implementation dispatch (no CUDA probing at import)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from adapt_runtime.kernels import torch_ops

Impl = Literal["auto", "torch", "triton"]


def _resolve(impl: str, device: torch.device) -> str:
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        return "torch"
    if impl == "triton":
        raise NotImplementedError("the Triton implementation is not available in this build")
    return impl


def _check_slots(slots: Tensor, n: int, unique: bool) -> None:
    if slots.dtype not in (torch.int32, torch.int64) or slots.dim() != 1:
        raise ValueError("slots must be a 1-D integer tensor")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= n):
        raise IndexError(f"slot index out of range for a state of {n} slots")
    if unique and slots.unique().numel() != slots.numel():
        raise ValueError("slots of one write must be distinct")


def apply(y: Tensor, x: Tensor, S: Tensor, slots: Tensor, offsets: Tensor | None = None, *,
          impl: Impl = "auto") -> Tensor:
    """Add each row's fast-weight output in place: ``y[t] += x[t] @ S[slot(t)]^T``.

    Args:
        y: `[M, d]` outputs, updated in place and returned.
        x: `[M, f]` down_proj inputs.
        S: `[N, d, f]` fast weights, one per slot.
        slots: `[R]` slot of each row (decode, ``offsets=None``, R == M) or of each token segment (prefill).
        offsets: `[R + 1]` segment bounds into the M token rows for prefill, or None for decode.
    """
    if x.dim() != 2 or y.dim() != 2 or S.dim() != 3 or x.shape[0] != y.shape[0]:
        raise ValueError(f"bad shapes: y {tuple(y.shape)}, x {tuple(x.shape)}, S {tuple(S.shape)}")
    if S.shape[1] != y.shape[1] or S.shape[2] != x.shape[1]:
        raise ValueError(f"S {tuple(S.shape)} does not match y {tuple(y.shape)} and x {tuple(x.shape)}")
    _check_slots(slots, S.shape[0], unique=False)
    if offsets is None and slots.numel() != x.shape[0]:
        raise ValueError("decode apply needs one slot per row")
    if offsets is not None and (offsets.numel() != slots.numel() + 1 or int(offsets[-1]) != x.shape[0]):
        raise ValueError("offsets must have len(slots) + 1 entries ending at the number of rows")
    _resolve(impl, x.device)
    return torch_ops.apply_torch(y, x, S, slots, offsets)


def write(S: Tensor, slots: Tensor, V: Tensor, X: Tensor, beta: Tensor | None = None, decay: float = 1.0,
          max_norm: Tensor | None = None, *, impl: Impl = "auto") -> Tensor:
    """In place, for each row r: ``S[slots[r]] = decay * S[slots[r]] + scale_r * V_r^T diag(beta_r) X_r``.

    ``scale_r = min(1, max_norm_r / ||U_r||_F)`` is the Frobenius clip. A row whose write norm is not finite
    leaves its slot untouched (neither decayed nor written).

    Args:
        S: `[N, d, f]` fast weights (float32 or bfloat16), updated in place.
        slots: `[R]` distinct slots to write.
        V: `[R, C, d]` targets; X: `[R, C, f]` keys; beta: `[R, C]` per-token rates or None (all ones).
        decay: factor on the old S of each written slot.
        max_norm: `[R]` absolute Frobenius bounds, or None (no clip).

    Returns:
        `[R]` float32 norms of the unclipped writes (non-finite where a write was refused).
    """
    if V.dim() != 3 or X.dim() != 3 or V.shape[:2] != X.shape[:2] or V.shape[0] != slots.numel():
        raise ValueError(f"bad shapes: V {tuple(V.shape)}, X {tuple(X.shape)}, slots {tuple(slots.shape)}")
    if S.shape[1] != V.shape[2] or S.shape[2] != X.shape[2]:
        raise ValueError(f"S {tuple(S.shape)} does not match V {tuple(V.shape)} and X {tuple(X.shape)}")
    if beta is not None and beta.shape != V.shape[:2]:
        raise ValueError(f"beta must be [R, C] = {tuple(V.shape[:2])}, got {tuple(beta.shape)}")
    _check_slots(slots, S.shape[0], unique=True)
    _resolve(impl, S.device)
    return torch_ops.write_torch(S, slots, V, X, beta, decay, max_norm)


def apply_write(y: Tensor, x: Tensor, S: Tensor, slot: int, V: Tensor, beta: Tensor | None = None,
                decay: float = 1.0, max_norm: float | None = None, *, impl: Impl = "auto") -> Tensor:
    """Fused chunk step for one slot: ``y += x @ S[slot]^T`` with the old S, then ``write`` with ``X = x``.

    Args:
        y: `[C, d]`; x: `[C, f]`; S: `[N, d, f]`; V: `[C, d]`; beta: `[C]` or None.

    Returns:
        The float32 norm of the unclipped write (a 0-d tensor).
    """
    if not 0 <= slot < S.shape[0]:
        raise IndexError(f"slot {slot} out of range for a state of {S.shape[0]} slots")
    if x.shape[0] != y.shape[0] or V.shape[0] != x.shape[0]:
        raise ValueError("y, x and V must have the same number of rows")
    _resolve(impl, x.device)
    return torch_ops.apply_write_torch(y, x, S, slot, V, beta, decay, max_norm)
