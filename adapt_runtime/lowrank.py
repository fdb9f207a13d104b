"""Low-rank fast weights (``state_rank=r``): each plastic layer's S held as factors ``B [d, k]``, ``A [k, f]``.

``S = B A`` with ``k <= r``, so a session costs ``k (d + f)`` numbers per layer instead of ``d f``. A chunk's write
``U = V^T diag(beta) X`` (rank <= C), after the decay of S and the Frobenius clip, is folded in exactly by
concatenation, ``[decay B, (c beta V)^T] [A; X]``, then re-truncated to rank r by a thin QR of each factor and an SVD
of the small ``R_B R_A^T`` (cost ``O((d + f)(r + C)^2)``): the best rank-r approximation of ``decay S + c U``.
After truncation ``B = Q_B U_k Sigma_k`` and ``A = V_k^T Q_A^T``, so ``||S||_F = ||B||_F`` (the norm bound rescales B).
All in float32. ``adapt_runtime.write.apply_factors`` commits a chunk's write through ``fold_write`` (with the
overflow guard and the norm bound of every write); the dense path (``state_rank=None``, the default) never calls
this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adapt_runtime.kernels.torch_ops import write_norms

if TYPE_CHECKING:
    from adapt_runtime.rules import Write

Factors = tuple[Tensor, Tensor]


def truncate(B: Tensor, A: Tensor, rank: int) -> Factors:
    """The best rank-``rank`` factors of ``B @ A`` (``B [d, k]``, ``A [k, f]``) without forming the product."""
    qb, rb = torch.linalg.qr(B.float())  # [d, m], [m, k]
    qa, ra = torch.linalg.qr(A.float().T)  # [f, n], [n, k]
    u, sigma, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    keep = min(rank, sigma.numel())
    return (qb @ (u[:, :keep] * sigma[:keep])).contiguous(), (vh[:keep] @ qa.T).contiguous()


def fold_write(factors: Factors | None, shape: tuple[int, int], w: Write, decay: float, max_norm: float | None,
               rank: int) -> Factors | None:
    """``decay S + c U`` truncated to ``rank``; ``c`` clips ``||U||_F`` to ``max_norm``. None for a non-finite write."""
    v = w.V.float() * w.beta.float().unsqueeze(-1)  # [C, d]
    x = w.X.float()  # [C, f]
    norm = write_norms(w.V[None], w.X[None], w.beta[None])[0]  # ||v^T x||_F by its Gram form, as the dense write
    if not bool(torch.isfinite(norm)):
        return None
    scale = 1.0 if max_norm is None or float(norm) <= max_norm else max_norm / max(float(norm), 1e-30)
    if factors is None:
        d, f = shape
        factors = (torch.zeros(d, 0, device=v.device), torch.zeros(0, f, device=v.device))
    B, A = factors
    return truncate(torch.cat([B * decay, (v * scale).T], dim=1), torch.cat([A, x], dim=0), rank)


def dense(factors: Factors | None, shape: tuple[int, int]) -> Tensor:
    """``B @ A`` as a dense `[d, f]` tensor (zeros for None): for tests and reports."""
    if factors is None:
        return torch.zeros(shape)
    return factors[0] @ factors[1]


def apply_rows(y: Tensor, x: Tensor, per_row: list[Factors | None]) -> Tensor:
    """``y[b] + B_b (A_b x[b])`` for each row ``b`` of ``x [R, T, f]`` (rows with None are left as they are)."""
    out = []
    for r, factors in enumerate(per_row):
        if factors is None:
            out.append(y[r])
        else:
            B, A = factors
            out.append(y[r] + ((x[r].float() @ A.T) @ B.T).to(y.dtype))
    return torch.stack(out)


def apply_slots(y: Tensor, x: Tensor, B_slab: Tensor, A_slab: Tensor, slots: Tensor) -> Tensor:
    """``y[b] + B_s (A_s x[b])`` for each row ``b`` of ``x [R, T, f]`` with ``s = slots[b]``, from the slot pool's
    factor slabs ``B [N, d, r]``, ``A [N, r, f]`` (zero-padded past a row's rank): two batched matmuls for all rows.
    Rows in consecutive slots (a batch bound together) read the slabs through a view, without a gather."""
    first, count = None, slots.numel()
    if slots.device.type == "cpu":
        listed = slots.tolist()
        if listed == list(range(listed[0], listed[0] + count)):
            first = listed[0]
    if first is not None:
        B, A = B_slab[first : first + count], A_slab[first : first + count]
    else:
        B, A = B_slab[slots], A_slab[slots]
    h = torch.bmm(x.float(), A.transpose(1, 2))  # [R, T, r]
    return y + torch.bmm(h, B.transpose(1, 2)).to(y.dtype)
