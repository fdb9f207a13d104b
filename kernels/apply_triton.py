"""Triton ``apply``: ``y[t] += x[t] @ S[slot(t)]^T`` for decode rows and prefill token segments.

Decode (one token per row) is a batched GEMV: a program owns ``BLOCK_D`` outputs of one row and streams the
rows' slice of ``S[slot]`` through registers (1 FLOP per byte of S, memory-bound). Prefill uses ``tl.dot``
on ``BLOCK_T`` tokens of one segment. Both split the f axis over several programs when there are too few
programs to fill the GPU, then add fp32 partial sums with ``tl.atomic_add`` into a workspace that is added
to ``y`` after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adapt_runtime.kernels import triton_launch as tlx
from torch import Tensor

GRID_LIMIT = 65535  # CUDA's bound on the second and third grid dimensions


@triton.jit
def apply_decode_fwd_kernel(
    y, x, S, slots, ws,
    D, F, f_per_split,
    s_ym, s_yd, s_xm, s_xf, s_sn, s_sd, s_sf,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_f = tl.program_id(2)
    slot = tl.load(slots + row).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    f_start = pid_f * f_per_split
    f_end = tl.minimum(f_start + f_per_split, F)
    acc = tl.full([BLOCK_D], 0.0, dtype=tl.float32)
    for f0 in range(f_start, f_end, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < f_end
        xv = tl.load(x + row * s_xm + offs_f * s_xf, mask=mask_f, other=0.0).to(tl.float32)
        w_ptr = S + slot * s_sn + offs_d[:, None] * s_sd + offs_f[None, :] * s_sf
        w = tl.load(w_ptr, mask=mask_d[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    if SPLIT == 1:
        y_ptr = y + row * s_ym + offs_d * s_yd
        out = tl.load(y_ptr, mask=mask_d, other=0.0).to(tl.float32) + acc
        tl.store(y_ptr, out.to(y.dtype.element_ty), mask=mask_d)
    else:
        tl.atomic_add(ws + row * D + offs_d, acc, mask=mask_d)


@triton.jit
def apply_prefill_fwd_kernel(
    y, x, S, slots, offsets, ws,
    D, F, f_per_split,
    s_ym, s_yd, s_xm, s_xf, s_sn, s_sd, s_sf,
    DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    seg = tl.program_id(1)
    pid_tf = tl.program_id(2)
    pid_t = pid_tf // SPLIT
    pid_f = pid_tf % SPLIT
    start = tl.load(offsets + seg).to(tl.int64)
    end = tl.load(offsets + seg + 1).to(tl.int64)
    t0 = start + pid_t * BLOCK_T
    if t0 < end:
        slot = tl.load(slots + seg).to(tl.int64)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        f_start = pid_f * f_per_split
        f_end = tl.minimum(f_start + f_per_split, F)
        acc = tl.full([BLOCK_T, BLOCK_D], 0.0, dtype=tl.float32)
        for f0 in range(f_start, f_end, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask_f = offs_f < f_end
            xt = tl.load(x + offs_t[:, None] * s_xm + offs_f[None, :] * s_xf,
                         mask=mask_t[:, None] & mask_f[None, :], other=0.0)
            wt_ptr = S + slot * s_sn + offs_f[:, None] * s_sf + offs_d[None, :] * s_sd  # [BLOCK_F, BLOCK_D]
            wt = tl.load(wt_ptr, mask=mask_f[:, None] & mask_d[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT), wt.to(DOT), acc)
        mask = mask_t[:, None] & mask_d[None, :]
        if SPLIT == 1:
            y_ptr = y + offs_t[:, None] * s_ym + offs_d[None, :] * s_yd
            out = tl.load(y_ptr, mask=mask, other=0.0).to(tl.float32) + acc
            tl.store(y_ptr, out.to(y.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(ws + offs_t[:, None] * D + offs_d[None, :], acc, mask=mask)


def apply_triton(y: Tensor, x: Tensor, S: Tensor, slots: Tensor, offsets: Tensor | None = None, *,
                 split: int | None = None) -> Tensor:
    """Launch the decode or prefill kernel; arguments as ``adapt_runtime.kernels.apply`` (already validated).

    Args:
        split: pieces of the f axis (split-K), or None to choose from the number of SMs.
    """
    m, d = y.shape
    f = x.shape[1]
    if m == 0 or slots.numel() == 0:
        return y
    decode = offsets is None
    kernel = apply_decode_fwd_kernel if decode else apply_prefill_fwd_kernel
    interpret = tlx.interpreted(kernel)
    t = tlx.tiles("decode" if decode else "prefill", interpret)
    rows = slots.numel()
    t_blocks = 1
    block_t = t.block_t
    if offsets is not None:  # prefill
        longest = int((offsets[1:] - offsets[:-1]).max())
        block_t = min(block_t, max(16, triton.next_power_of_2(longest)))
        t_blocks = max(1, triton.cdiv(longest, block_t))
    d_blocks, f_blocks = triton.cdiv(d, t.block_d), triton.cdiv(f, t.block_f)
    if split is None:
        split = tlx.split_for(d_blocks * rows * t_blocks, f_blocks, y.device)
    f_per_split = triton.cdiv(f_blocks, split) * t.block_f
    split = triton.cdiv(f, f_per_split)
    if rows > GRID_LIMIT or t_blocks * split > GRID_LIMIT:
        raise ValueError(f"{rows} rows or segments (at most {GRID_LIMIT}) are too many for one launch")
    ws = torch.zeros((m, d) if split > 1 else (1,), dtype=torch.float32, device=y.device)
    strides = (*y.stride(), *x.stride(), *S.stride())
    if decode:
        apply_decode_fwd_kernel[(d_blocks, rows, split)](
            y, x, S, slots, ws, d, f, f_per_split, *strides,
            BLOCK_D=t.block_d, BLOCK_F=t.block_f, SPLIT=split, num_warps=t.num_warps,
        )
    else:
        dot = tlx.dot_dtype(x.dtype, S.dtype, interpret=interpret)
        apply_prefill_fwd_kernel[(d_blocks, rows, t_blocks * split)](
            y, x, S, slots, offsets, ws, d, f, f_per_split, *strides,
            DOT=dot, BLOCK_T=block_t, BLOCK_D=t.block_d, BLOCK_F=t.block_f, SPLIT=split,
            num_warps=t.num_warps,
        )
    if split > 1:
        tlx.add_partials(y, ws)
    return y
