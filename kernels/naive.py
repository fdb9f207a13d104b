"""Naive twins of the fast-weight ops: plain PyTorch loops, float64 accumulation.

They define the semantics every other implementation (``torch``, ``triton``) is tested against. Same
signatures and layouts as the public ops in ``adapt_runtime.kernels``; slow on purpose.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _segments(slots: Tensor, offsets: Tensor | None, m: int) -> list[tuple[int, int, int]]:
    if offsets is None:
        return [(r, r + 1, int(slots[r])) for r in range(m)]
    return [(int(offsets[r]), int(offsets[r + 1]), int(slots[r])) for r in range(slots.numel())]


def apply_naive(y: Tensor, x: Tensor, S: Tensor, slots: Tensor, offsets: Tensor | None = None) -> Tensor:
    """``y[t] += x[t] @ S[slot(t)]^T`` for every token row ``t`` (see ``adapt_runtime.kernels.apply``)."""
    for start, end, slot in _segments(slots, offsets, x.shape[0]):
        if end > start:
            delta = x[start:end].double() @ S[slot].double().T
            y[start:end] = (y[start:end].double() + delta).to(y.dtype)
    return y


def write_naive(
    S: Tensor,
    slots: Tensor,
    V: Tensor,
    X: Tensor,
    beta: Tensor | None = None,
    decay: float = 1.0,
    max_norm: Tensor | None = None,
    erase: float = 0.0,
) -> Tensor:
    """``S[s] = decay * S[s] + scale * (V - erase X S[s]^T)^T diag(beta) X`` per slot (see
    ``adapt_runtime.kernels.write``); ``erase = 0`` is the plain write, ``erase != 0`` the delta form."""
    norms = torch.empty(slots.numel(), dtype=torch.float32, device=S.device)
    for r in range(slots.numel()):
        v, x = V[r].double(), X[r].double()
        if erase:
            v = v - erase * (x @ S[int(slots[r])].double().T)  # what the old S retrieves at each key
        if beta is not None:
            v = v * beta[r].double()[:, None]
        update = v.T @ x  # [d, f]
        norm = torch.linalg.vector_norm(update)
        norms[r] = norm.float()
        if not torch.isfinite(norm):
            continue
        scale = 1.0
        if max_norm is not None and norm > float(max_norm[r]):
            scale = float(max_norm[r]) / float(norm)
        s = int(slots[r])
        S[s] = (decay * S[s].double() + scale * update).to(S.dtype)
    return norms


def apply_write_naive(
    y: Tensor,
    x: Tensor,
    S: Tensor,
    slot: int,
    V: Tensor,
    beta: Tensor | None = None,
    decay: float = 1.0,
    max_norm: float | None = None,
) -> Tensor:
    """One chunk of one slot: ``y += x @ S[slot]^T`` with the old S, then write ``V^T diag(beta) x``."""
    slots = torch.tensor([slot], device=S.device)
    apply_naive(y, x, S, slots, torch.tensor([0, x.shape[0]], device=S.device))
    bound = None if max_norm is None else torch.tensor([max_norm], dtype=torch.float32, device=S.device)
    b = None if beta is None else beta[None]
    return write_naive(S, slots, V[None], x[None], b, decay, bound)[0]


def chunk_scan_naive(
    y: Tensor,
    x: Tensor,
    S: Tensor,
    slot: int,
    offsets: Tensor,
    V: Tensor,
    X: Tensor,
    write_offsets: Tensor,
    beta: Tensor | None = None,
    decay: float = 1.0,
    max_norm: float | None = None,
    base: Tensor | None = None,
) -> Tensor:
    """A span of one slot, piece by piece: piece k (rows ``offsets[k]:offsets[k+1]``) gets ``x (base + S_k)^T``,
    then (for ``k < J``) chunk k is written, ``S_{k+1} = decay * S_k + scale_k * V_k^T diag(beta_k) X_k`` (rows
    ``write_offsets[k]:write_offsets[k+1]`` of V, X and beta); a chunk whose norm is not finite is skipped. S is
    rounded to its dtype once, at the end. Returns the `[J]` unclipped norms."""
    bounds, wbounds = offsets.tolist(), write_offsets.tolist()
    J = len(wbounds) - 1
    norms = torch.empty(J, dtype=torch.float32, device=S.device)
    s = S[slot].double()
    for k in range(len(bounds) - 1):
        a, e = bounds[k], bounds[k + 1]
        if e > a:
            weight = s if base is None else base.double() + s
            y[a:e] = (y[a:e].double() + x[a:e].double() @ weight.T).to(y.dtype)
        if k >= J:
            continue
        p, q = wbounds[k], wbounds[k + 1]
        v = V[p:q].double()
        if beta is not None:
            v = v * beta[p:q].double()[:, None]
        update = v.T @ X[p:q].double()
        norm = torch.linalg.vector_norm(update)
        norms[k] = norm.float()
        if not torch.isfinite(norm):
            continue
        scale = 1.0 if max_norm is None or norm <= max_norm else max_norm / float(norm)
        s = decay * s + scale * update
    S[slot] = s.to(S.dtype)
    return norms
