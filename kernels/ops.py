"""Public fast-weight ops with validation and implementation dispatch (no CUDA probing at import)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Literal

import torch
from adapt_runtime.kernels import torch_ops
from torch import Tensor

Impl = Literal["auto", "torch", "triton"]


STATE_DTYPES = (torch.float32, torch.bfloat16)
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _resolve(impl: str, state: Tensor, *activations: Tensor) -> str:
    """Pick ``torch`` or ``triton``: ``auto`` means Triton on CUDA for supported dtypes, torch otherwise.

    The Triton kernels have no backward, so ``auto`` also takes torch while autograd records through an input.
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "torch":
        return "torch"
    supported = state.dtype in STATE_DTYPES and all(t.dtype in ACTIVATION_DTYPES for t in activations)
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (state, *activations))
    if impl == "auto":
        cuda = state.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return "triton" if cuda and supported and not recording else "torch"
    if recording:
        raise RuntimeError("impl='triton' has no backward; use impl='torch' (or 'auto') under autograd")
    if not supported:
        raise TypeError(f"impl='triton' supports state {STATE_DTYPES} and activations {ACTIVATION_DTYPES}, "
                        f"got {state.dtype} and {[t.dtype for t in activations]}")
    if state.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("impl='triton' on CPU tensors needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before triton is first imported")
    if state.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"impl='triton' needs CUDA (or CPU under the interpreter), not {state.device}")
    return "triton"


def _check_device(*tensors: Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def _triton(name: str, device: torch.device) -> ModuleType:
    """Import a Triton module on first use, so that importing this package never imports Triton."""
    module = importlib.import_module(f"adapt_runtime.kernels.{name}")
    launch = importlib.import_module("adapt_runtime.kernels.triton_launch")
    if device.type == "cpu" and not launch.interpreting():
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set, so its kernels are "
                           "compiled for the GPU and cannot take CPU tensors")
    return module


def _check_slots(slots: Tensor, n: int, unique: bool) -> None:
    if slots.dtype not in (torch.int32, torch.int64) or slots.dim() != 1:
        raise ValueError("slots must be a 1-D integer tensor")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= n):
        raise IndexError(f"slot index out of range for a state of {n} slots")
    if unique and slots.unique().numel() != slots.numel():
        raise ValueError("slots of one write must be distinct")


def _check_offsets(offsets: Tensor, segments: int, m: int) -> None:
    if offsets.dtype not in (torch.int32, torch.int64) or offsets.dim() != 1:
        raise ValueError("offsets must be a 1-D integer tensor")
    if offsets.numel() != segments + 1 or int(offsets[-1]) != m:
        raise ValueError("offsets must have len(slots) + 1 entries ending at the number of rows")
    if int(offsets[0]) < 0 or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets must be non-negative and non-decreasing")


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
    if offsets is not None:
        _check_offsets(offsets, slots.numel(), x.shape[0])
    _check_device(y, x, S, slots, offsets)
    if _resolve(impl, S, y, x) == "triton":
        return _triton("apply_triton", S.device).apply_triton(y, x, S, slots, offsets)
    return torch_ops.apply_torch(y, x, S, slots, offsets)


def write(S: Tensor, slots: Tensor, V: Tensor, X: Tensor, beta: Tensor | None = None, decay: float = 1.0,
          max_norm: Tensor | None = None, erase: float = 0.0, *, impl: Impl = "auto") -> Tensor:
    """In place, for each row r: ``S[slots[r]] = decay * S[slots[r]] + scale_r * U_r`` with the write
    ``U_r = V_r'^T diag(beta_r) X_r``, ``V_r' = V_r - erase * X_r S[slots[r]]^T`` (the old S).

    ``erase = 0`` is the plain write ``V^T diag(beta) X``; ``erase = 1`` the delta rule (DeltaNet): each target less
    what S already retrieves at its key, so a key written again overwrites rather than adds (``erase = decay``
    retrieves from the decayed S, as gated DeltaNet). ``scale_r = min(1, max_norm_r / ||U_r||_F)`` is the Frobenius
    clip. A row whose write norm is not finite leaves its slot untouched (neither decayed nor written).

    Args:
        S: `[N, d, f]` fast weights (float32 or bfloat16), updated in place.
        slots: `[R]` distinct slots to write.
        V: `[R, C, d]` targets; X: `[R, C, f]` keys; beta: `[R, C]` per-token rates or None (all ones).
        decay: factor on the old S of each written slot.
        max_norm: `[R]` absolute Frobenius bounds, or None (no clip).
        erase: the delta form's factor on the retrieval ``X S^T`` (0: the plain write).

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
    if max_norm is not None and max_norm.shape != slots.shape:
        raise ValueError(f"max_norm must be [R] = {tuple(slots.shape)}, got {tuple(max_norm.shape)}")
    _check_device(S, slots, V, X, beta, max_norm)
    erase = float(erase)
    if _resolve(impl, S, V, X) == "triton":
        return _triton("write_triton", S.device).write_triton(S, slots, V, X, beta, decay, max_norm, erase)
    return torch_ops.write_torch(S, slots, V, X, beta, decay, max_norm, erase)


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
    if y.dim() != 2 or x.dim() != 2 or V.dim() != 2 or S.dim() != 3:
        shapes = f"y {tuple(y.shape)}, x {tuple(x.shape)}, V {tuple(V.shape)}, S {tuple(S.shape)}"
        raise ValueError(f"bad shapes: {shapes}")
    if S.shape[1] != y.shape[1] or S.shape[1] != V.shape[1] or S.shape[2] != x.shape[1]:
        raise ValueError(f"S {tuple(S.shape)} does not match y {tuple(y.shape)}, V {tuple(V.shape)}, "
                         f"x {tuple(x.shape)}")
    if beta is not None and beta.shape != (x.shape[0],):
        raise ValueError(f"beta must be [C] = ({x.shape[0]},), got {tuple(beta.shape)}")
    _check_device(y, x, S, V, beta)
    if _resolve(impl, S, y, x, V) == "triton":
        module = _triton("apply_write_triton", S.device)
        return module.apply_write_triton(y, x, S, slot, V, beta, decay, max_norm)
    return torch_ops.apply_write_torch(y, x, S, slot, V, beta, decay, max_norm)


def chunk_scan(y: Tensor, x: Tensor, S: Tensor, slot: int, offsets: Tensor, V: Tensor, X: Tensor,
               write_offsets: Tensor, beta: Tensor | None = None, decay: float = 1.0,
               max_norm: float | None = None, base: Tensor | None = None, *, impl: Impl = "auto") -> Tensor:
    """A span of one slot whose chunk writes are all known before it is applied (targets that do not read the
    span's outputs): ``apply`` and ``write`` alternated chunk by chunk, in one op.

    For each piece k (rows ``offsets[k]:offsets[k+1]`` of y and x): ``y += x (base + S_k)^T`` (``base`` None: 0),
    then, for ``k < J``, chunk k is written: ``S_{k+1} = decay * S_k + scale_k * V_k^T diag(beta_k) X_k`` with
    rows ``write_offsets[k]:write_offsets[k+1]`` of V, X and beta, ``scale_k`` the Frobenius clip to ``max_norm``
    as ``write``. A chunk whose write norm is not finite is refused (``S_{k+1} = S_k``) and the later chunks still
    written. ``S[slot]`` ends as ``S_K`` (rounded to its dtype once).

    Args:
        y: `[T, d]` outputs, updated in place; x: `[T, f]` inputs; S: `[N, d, f]`; slot: the slot of the span.
        offsets: `[K + 1]` piece bounds into the T rows (from 0 or more, non-decreasing, ending at T).
        V: `[M, d]` targets; X: `[M, f]` keys; beta: `[M]` or None; write_offsets: `[J + 1]`, J <= K, ending at M.
        base: `[d, f]` weight added to S in every piece's product (the static ``W0``: y then starts as the bias).

    Returns:
        `[J]` float32 norms of the unclipped writes (non-finite where a chunk was refused).
    """
    if y.dim() != 2 or x.dim() != 2 or S.dim() != 3 or V.dim() != 2 or X.dim() != 2:
        shapes = f"y {tuple(y.shape)}, x {tuple(x.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)}, X {tuple(X.shape)}"
        raise ValueError(f"bad shapes: {shapes}")
    if not 0 <= slot < S.shape[0]:
        raise IndexError(f"slot {slot} out of range for a state of {S.shape[0]} slots")
    if x.shape[0] != y.shape[0] or V.shape[0] != X.shape[0]:
        raise ValueError("y and x, and V and X, must have the same number of rows")
    d, f = S.shape[1:]
    if y.shape[1] != d or V.shape[1] != d or x.shape[1] != f or X.shape[1] != f:
        raise ValueError(f"S {tuple(S.shape)} does not match y {tuple(y.shape)}, x {tuple(x.shape)}, "
                         f"V {tuple(V.shape)}, X {tuple(X.shape)}")
    if offsets.numel() < 1 or write_offsets.numel() < 1:
        raise ValueError("offsets and write_offsets need at least one entry")
    _check_offsets(offsets, offsets.numel() - 1, x.shape[0])
    _check_offsets(write_offsets, write_offsets.numel() - 1, X.shape[0])
    if write_offsets.numel() > offsets.numel():
        raise ValueError("more chunk writes than pieces: write_offsets may have at most len(offsets) entries")
    if beta is not None and beta.shape != (V.shape[0],):
        raise ValueError(f"beta must be [M] = ({V.shape[0]},), got {tuple(beta.shape)}")
    if base is not None and base.shape != (d, f):
        raise ValueError(f"base must be [d, f] = ({d}, {f}), got {tuple(base.shape)}")
    _check_device(y, x, S, offsets, V, X, write_offsets, beta, base)
    activations = (y, x, V, X) if base is None else (y, x, V, X, base)
    if _resolve(impl, S, *activations) == "triton":
        module = _triton("chunk_scan_triton", S.device)
        return module.chunk_scan_triton(y, x, S, slot, offsets, V, X, write_offsets, beta, decay, max_norm, base)
    return torch_ops.chunk_scan_torch(y, x, S, slot, offsets, V, X, write_offsets, beta, decay, max_norm, base)
