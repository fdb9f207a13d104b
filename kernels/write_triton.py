"""Triton ``write``: ``S[s] = decay * S[s] + scale_s * V_s^T diag(beta_s) X_s`` in place, one pass over S.

A program owns one ``[BLOCK_D, BLOCK_F]`` tile of one written slot: it accumulates the chunk's outer
products over C in fp32 with ``tl.dot``, then reads the tile once, decays it, adds the scaled write and
stores it once. The Frobenius clip needs the write's norm before any tile is written; it comes from the Gram
identity ``||V^T diag(b) X||_F^2 = sum((Vb Vb^T) * (X X^T))`` (two C x C products), so no second pass over S
is needed. A slot whose write norm is not finite is left untouched: its programs return before loading
anything.

The delta form (``erase != 0``) first forms the targets ``V' = V - erase * X S^T`` with the old S
(``delta_targets_kernel``: a program owns ``[BLOCK_C, BLOCK_D]`` of one row's targets and streams its rows of S over
f); the clip's Gram norm needs all of ``V'`` before any tile is written, so this is a launch of its own (one more
read of the written slots), and the write kernel then runs on ``V'`` as on any targets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adapt_runtime.kernels import triton_launch as tlx
from adapt_runtime.kernels.torch_ops import write_scales
from torch import Tensor


@triton.jit
def write_fwd_kernel(
    S, slots, V, X, beta, scales, live,
    C, D, F, decay,
    s_sn, s_sd, s_sf, s_vr, s_vc, s_vd, s_xr, s_xc, s_xf, s_br, s_bc,
    HAS_BETA: tl.constexpr, DOT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    r = tl.program_id(2).to(tl.int64)
    if tl.load(live + r) != 0:
        slot = tl.load(slots + r).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_d = offs_d < D
        mask_f = offs_f < F
        acc = tl.full([BLOCK_D, BLOCK_F], 0.0, dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            v_ptr = V + r * s_vr + offs_d[:, None] * s_vd + offs_c[None, :] * s_vc  # [BLOCK_D, BLOCK_C]
            v = tl.load(v_ptr, mask=mask_d[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            if HAS_BETA:
                b = tl.load(beta + r * s_br + offs_c * s_bc, mask=mask_c, other=0.0).to(tl.float32)
                v = v * b[None, :]
            x_ptr = X + r * s_xr + offs_c[:, None] * s_xc + offs_f[None, :] * s_xf  # [BLOCK_C, BLOCK_F]
            xk = tl.load(x_ptr, mask=mask_c[:, None] & mask_f[None, :], other=0.0)
            acc = tl.dot(v.to(DOT), xk.to(DOT), acc)
        scale = tl.load(scales + r)
        mask = mask_d[:, None] & mask_f[None, :]
        s_ptr = S + slot * s_sn + offs_d[:, None] * s_sd + offs_f[None, :] * s_sf
        tile = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
        tile = decay * tile + scale * acc
        tl.store(s_ptr, tile.to(S.dtype.element_ty), mask=mask)


@triton.jit
def delta_targets_kernel(
    out, S, slots, V, X,
    C, D, F, erase,
    s_sn, s_sd, s_sf, s_vr, s_vc, s_vd, s_xr, s_xc, s_xf,
    DOT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = tl.program_id(2).to(tl.int64)
    slot = tl.load(slots + r).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = offs_c < C
    mask_d = offs_d < D
    acc = tl.full([BLOCK_C, BLOCK_D], 0.0, dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        x_ptr = X + r * s_xr + offs_c[:, None] * s_xc + offs_f[None, :] * s_xf  # [BLOCK_C, BLOCK_F]
        xk = tl.load(x_ptr, mask=mask_c[:, None] & mask_f[None, :], other=0.0)
        s_ptr = S + slot * s_sn + offs_d[None, :] * s_sd + offs_f[:, None] * s_sf  # S^T tile [BLOCK_F, BLOCK_D]
        st = tl.load(s_ptr, mask=mask_f[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(xk.to(DOT), st.to(DOT), acc)
    mask = mask_c[:, None] & mask_d[None, :]
    v = tl.load(V + r * s_vr + offs_c[:, None] * s_vc + offs_d[None, :] * s_vd, mask=mask, other=0.0)
    o_ptr = out + r * C * D + offs_c[:, None] * D + offs_d[None, :]
    tl.store(o_ptr, v.to(tl.float32) - erase * acc, mask=mask)


def delta_targets_triton(S: Tensor, slots: Tensor, V: Tensor, X: Tensor, erase: float) -> Tensor:
    """`[R, C, d]` float32 targets ``V_r - erase * X_r S[slots[r]]^T`` (the delta form), one launch."""
    rows, c, d = V.shape
    f = X.shape[2]
    out = torch.empty(rows, c, d, dtype=torch.float32, device=V.device)
    if rows == 0 or c == 0:
        return out
    interpret = tlx.interpreted(delta_targets_kernel)
    t = tlx.tiles("write", interpret)
    block_c = max(16, min(t.block_t, triton.next_power_of_2(c)))
    grid = (triton.cdiv(d, t.block_d), triton.cdiv(c, block_c), rows)
    delta_targets_kernel[grid](
        out, S, slots, V, X, c, d, f, float(erase),
        *S.stride(), *V.stride(), *X.stride(),
        DOT=tlx.dot_dtype(X.dtype, S.dtype, interpret=interpret),
        BLOCK_C=block_c, BLOCK_D=t.block_d, BLOCK_F=t.block_f, num_warps=t.num_warps,
    )
    return out


def gram_norms(V: Tensor, X: Tensor, beta: Tensor | None) -> Tensor:
    """`[R]` float32 Frobenius norms of ``V_r^T diag(beta_r) X_r``, from the Gram identity (never formed).

    The C x C products run in bfloat16 when V and X both are (tensor cores; the norm only sets the clip), in
    float32 otherwise (a float16 Gram matrix could overflow).
    """
    v = V.float() if beta is None else V.float() * beta.float().unsqueeze(-1)
    x = X
    if not (V.dtype == X.dtype == torch.bfloat16):
        x = X.float()
    v = v.to(x.dtype)
    gram = torch.bmm(v, v.transpose(1, 2)).float() * torch.bmm(x, x.transpose(1, 2)).float()
    return gram.sum(dim=(1, 2)).clamp_min(0).sqrt()


def write_triton(S: Tensor, slots: Tensor, V: Tensor, X: Tensor, beta: Tensor | None = None,
                 decay: float = 1.0, max_norm: Tensor | None = None, erase: float = 0.0) -> Tensor:
    """Launch the write kernel; arguments and return as ``adapt_runtime.kernels.write`` (validated)."""
    if erase:
        V = delta_targets_triton(S, slots, V, X, erase)
    rows, c, d = V.shape
    f = X.shape[2]
    norms = gram_norms(V, X, beta)
    if rows == 0:
        return norms
    scales = write_scales(norms, max_norm).contiguous()
    live = torch.isfinite(norms).to(torch.int32)
    interpret = tlx.interpreted(write_fwd_kernel)
    t = tlx.tiles("write", interpret)
    b = beta if beta is not None else scales  # never read when HAS_BETA is False
    b_strides = beta.stride() if beta is not None else (0, 0)
    grid = (triton.cdiv(d, t.block_d), triton.cdiv(f, t.block_f), rows)
    write_fwd_kernel[grid](
        S, slots, V, X, b, scales, live, c, d, f, float(decay),
        *S.stride(), *V.stride(), *X.stride(), *b_strides,
        HAS_BETA=beta is not None, DOT=tlx.dot_dtype(V.dtype, X.dtype, interpret=interpret),
        BLOCK_C=t.block_t, BLOCK_D=t.block_d, BLOCK_F=t.block_f, num_warps=t.num_warps,
    )
    return norms
