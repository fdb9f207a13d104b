"""Triton ``apply_write``: one chunk of one slot, ``y += x @ S^T`` with the old S, then the write, in one
pass.

A program owns a ``BLOCK_D``-row stripe of ``S[slot]`` (or a piece of it along f, see ``split``) and walks
it in ``[BLOCK_D, BLOCK_F]`` tiles. Each tile is loaded once, used for the chunk's outputs (``acc_y[C,
BLOCK_D] += x[C, BLOCK_F] @ tile^T``), decayed and updated with ``scale * Vb^T x``, and stored once; ``Vb =
diag(beta) V`` for the stripe stays in registers. The outputs of the stripe are added to ``y`` at the end.

The chunk lives in registers, so the fused kernel takes ``C <= MAX_FUSED_C`` tokens. Longer chunks run the
prefill ``apply`` and then ``write``, which reads S twice; at that length both products are compute-bound
(about 2C FLOPs per element of S against 4-8 bytes), so the second read costs little.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adapt_runtime.kernels import triton_launch as tlx
from adapt_runtime.kernels.apply_triton import apply_triton
from adapt_runtime.kernels.torch_ops import write_scales
from adapt_runtime.kernels.write_triton import gram_norms, write_triton
from torch import Tensor

MAX_FUSED_C = 128


@triton.jit
def apply_write_fwd_kernel(
    y, x, S, V, beta, scale_ptr, live_ptr, ws,
    C, D, F, f_per_split, decay,
    s_yc, s_yd, s_xc, s_xf, s_sd, s_sf, s_vc, s_vd, s_bc,
    HAS_BETA: tl.constexpr, DOT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    v = tl.load(V + offs_d[:, None] * s_vd + offs_c[None, :] * s_vc,
                mask=mask_d[:, None] & mask_c[None, :], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_C]
    if HAS_BETA:
        v = v * tl.load(beta + offs_c * s_bc, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    v = v.to(DOT)
    live = tl.load(live_ptr)
    scale = tl.load(scale_ptr)
    f_start = pid_f * f_per_split
    f_end = tl.minimum(f_start + f_per_split, F)
    acc_y = tl.full([BLOCK_C, BLOCK_D], 0.0, dtype=tl.float32)
    for f0 in range(f_start, f_end, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < f_end
        xk = tl.load(x + offs_c[:, None] * s_xc + offs_f[None, :] * s_xf,
                     mask=mask_c[:, None] & mask_f[None, :], other=0.0).to(DOT)  # [BLOCK_C, BLOCK_F]
        mask = mask_d[:, None] & mask_f[None, :]
        s_ptr = S + offs_d[:, None] * s_sd + offs_f[None, :] * s_sf
        tile = tl.load(s_ptr, mask=mask, other=0.0)  # [BLOCK_D, BLOCK_F]
        acc_y = tl.dot(xk, tl.trans(tile.to(DOT)), acc_y)
        if live != 0:
            new = decay * tile.to(tl.float32) + scale * tl.dot(v, xk)
            tl.store(s_ptr, new.to(S.dtype.element_ty), mask=mask)
    mask_y = mask_c[:, None] & mask_d[None, :]
    if SPLIT == 1:
        y_ptr = y + offs_c[:, None] * s_yc + offs_d[None, :] * s_yd
        out = tl.load(y_ptr, mask=mask_y, other=0.0).to(tl.float32) + acc_y
        tl.store(y_ptr, out.to(y.dtype.element_ty), mask=mask_y)
    else:
        tl.atomic_add(ws + offs_c[:, None] * D + offs_d[None, :], acc_y, mask=mask_y)


def apply_write_triton(
    y: Tensor, x: Tensor, S: Tensor, slot: int, V: Tensor, beta: Tensor | None = None, decay: float = 1.0,
    max_norm: float | None = None, *, split: int | None = None,
) -> Tensor:
    """Launch the fused kernel (or apply then write for long chunks); arguments as ``kernels.apply_write``.

    Args:
        split: pieces of the f axis (split-K for the outputs), or None to choose from the number of SMs.
    """
    c, d = y.shape
    f = x.shape[1]
    bound = None if max_norm is None else torch.tensor([max_norm], dtype=torch.float32, device=S.device)
    if c > MAX_FUSED_C:
        slots = torch.tensor([slot], device=S.device)
        apply_triton(y, x, S, slots, torch.tensor([0, c], device=S.device), split=split)
        b = None if beta is None else beta[None]
        return write_triton(S, slots, V[None], x[None], b, decay, bound)[0]
    norms = gram_norms(V[None], x[None], None if beta is None else beta[None])
    scale = write_scales(norms, bound)
    live = torch.isfinite(norms).to(torch.int32)
    interpret = tlx.interpreted(apply_write_fwd_kernel)
    t = tlx.tiles("fused", interpret)
    d_blocks, f_blocks = triton.cdiv(d, t.block_d), triton.cdiv(f, t.block_f)
    if split is None:
        split = tlx.split_for(d_blocks, f_blocks, S.device)
    f_per_split = triton.cdiv(f_blocks, split) * t.block_f
    split = triton.cdiv(f, f_per_split)
    ws = torch.zeros((c, d) if split > 1 else (1,), dtype=torch.float32, device=y.device)
    b = beta if beta is not None else scale  # never read when HAS_BETA is False
    state = S[slot]
    apply_write_fwd_kernel[(d_blocks, split)](
        y, x, state, V, b, scale, live, ws, c, d, f, f_per_split, float(decay),
        *y.stride(), *x.stride(), *state.stride(), *V.stride(), b.stride(0) if beta is not None else 0,
        HAS_BETA=beta is not None, DOT=tlx.dot_dtype(x.dtype, V.dtype, S.dtype, interpret=interpret),
        BLOCK_C=max(16, triton.next_power_of_2(c)), BLOCK_D=t.block_d, BLOCK_F=t.block_f, SPLIT=split,
        num_warps=t.num_warps,
    )
    if split > 1:
        tlx.add_partials(y, ws)
    return norms[0]
