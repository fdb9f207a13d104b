"""Triton ``chunk_scan``: a span of one slot, apply and write alternated chunk by chunk, with S read and written
once.

A program owns one ``[BLOCK_D, BLOCK_F]`` tile of the slot (and of ``base``) and keeps it in registers, in float32,
for the whole span. For each piece k it adds the tile's share of the piece's outputs,
``x[:, tile's f] (base + S_k)[tile]^T``, into a float32 workspace with ``tl.atomic_add`` (the ``F / BLOCK_F``
programs of a d-stripe all add to the same outputs), then applies chunk k's write to the tile,
``tile = decay * tile + scale_k * Vb_k[tile's d]^T X_k[:, tile's f]``; the tile is stored once at the end. The
workspace is added to ``y`` once (one rounding to y's dtype).

Every chunk's scale must be known before the first tile is touched: since V and X are all given, their norms come
from the Gram identity (kernels/README.md) in one batched product before the launch, and a chunk with a non-finite
norm is skipped by every program (the tile stays ``S_k``). A chunk's write is independent of the outputs, so only
rules whose targets do not read ``y`` can use this op (``adapt_runtime.one_pass``).

Traffic: S and base once each, x once per d-stripe and V, X once per tile (against the apply/write loop's two reads
and one write of S per chunk); the price is the atomics on the outputs, ``T d F / BLOCK_F`` of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adapt_runtime.kernels import triton_launch as tlx
from adapt_runtime.kernels.torch_ops import write_scales
from adapt_runtime.kernels.write_triton import gram_norms
from torch import Tensor


@triton.jit
def chunk_scan_fwd_kernel(
    ws, x, S, base, V, X, beta, scales, live, offsets, woffsets,
    K, J, D, F, decay,
    s_xt, s_xf, s_sd, s_sf, s_wd, s_wf, s_vm, s_vd, s_km, s_kf, s_bm,
    HAS_BETA: tl.constexpr, HAS_BASE: tl.constexpr, DOT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_d = offs_d < D
    mask_f = offs_f < F
    mask = mask_d[:, None] & mask_f[None, :]
    s_ptr = S + offs_d[:, None] * s_sd + offs_f[None, :] * s_sf
    tile = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)  # S_k, carried across the span
    w0 = tl.full([BLOCK_D, BLOCK_F], 0.0, dtype=tl.float32)
    if HAS_BASE:
        w0 = tl.load(base + offs_d[:, None] * s_wd + offs_f[None, :] * s_wf, mask=mask, other=0.0).to(tl.float32)
    for k in range(0, K):
        a = tl.load(offsets + k)
        e = tl.load(offsets + k + 1)
        w = (w0 + tile).to(DOT)
        for c0 in range(a, e, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < e
            xk = tl.load(x + offs_c[:, None] * s_xt + offs_f[None, :] * s_xf,
                         mask=mask_c[:, None] & mask_f[None, :], other=0.0).to(DOT)  # [BLOCK_C, BLOCK_F]
            part = tl.dot(xk, tl.trans(w))  # [BLOCK_C, BLOCK_D]
            tl.atomic_add(ws + offs_c[:, None] * D + offs_d[None, :], part, mask=mask_c[:, None] & mask_d[None, :])
        if tl.load(live + k, mask=k < J, other=0) != 0:  # chunk k is written (and its write not refused)
            p = tl.load(woffsets + k)
            q = tl.load(woffsets + k + 1)
            update = tl.full([BLOCK_D, BLOCK_F], 0.0, dtype=tl.float32)
            for c0 in range(p, q, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < q
                v = tl.load(V + offs_d[:, None] * s_vd + offs_c[None, :] * s_vm,
                            mask=mask_d[:, None] & mask_c[None, :], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_C]
                if HAS_BETA:
                    v = v * tl.load(beta + offs_c * s_bm, mask=mask_c, other=0.0).to(tl.float32)[None, :]
                keys = tl.load(X + offs_c[:, None] * s_km + offs_f[None, :] * s_kf,
                               mask=mask_c[:, None] & mask_f[None, :], other=0.0)  # [BLOCK_C, BLOCK_F]
                update = tl.dot(v.to(DOT), keys.to(DOT), update)
            tile = decay * tile + tl.load(scales + k) * update
    tl.store(s_ptr, tile.to(S.dtype.element_ty), mask=mask)


def chunk_norms(V: Tensor, X: Tensor, beta: Tensor | None, write_offsets: Tensor) -> Tensor:
    """`[J]` float32 norms of the chunks' writes (Gram identity): one batched product when the chunks have one
    length, one per chunk otherwise."""
    bounds = write_offsets.tolist()
    lengths = {q - p for p, q in zip(bounds[:-1], bounds[1:])}
    J = len(bounds) - 1
    if J == 0:
        return torch.empty(0, dtype=torch.float32, device=V.device)
    if len(lengths) == 1:
        (n,) = lengths
        rows = slice(bounds[0], bounds[-1])
        b = None if beta is None else beta[rows].reshape(J, n)
        return gram_norms(V[rows].reshape(J, n, -1), X[rows].reshape(J, n, -1), b)
    return torch.cat([gram_norms(V[None, p:q], X[None, p:q], None if beta is None else beta[None, p:q])
                      for p, q in zip(bounds[:-1], bounds[1:])])


def chunk_scan_triton(
    y: Tensor, x: Tensor, S: Tensor, slot: int, offsets: Tensor, V: Tensor, X: Tensor, write_offsets: Tensor,
    beta: Tensor | None = None, decay: float = 1.0, max_norm: float | None = None, base: Tensor | None = None,
) -> Tensor:
    """Launch the scan kernel; arguments and return as ``adapt_runtime.kernels.chunk_scan`` (validated)."""
    t_rows, d = y.shape
    f = x.shape[1]
    norms = chunk_norms(V, X, beta, write_offsets)
    bound = None if max_norm is None else torch.tensor([max_norm], dtype=torch.float32, device=S.device)
    scales = write_scales(norms, bound).contiguous()
    live = torch.isfinite(norms).to(torch.int32)
    K, J = offsets.numel() - 1, write_offsets.numel() - 1
    if K == 0:
        return norms
    interpret = tlx.interpreted(chunk_scan_fwd_kernel)
    t = tlx.tiles("scan", interpret)
    ws = torch.zeros(t_rows, d, dtype=torch.float32, device=y.device)
    state = S[slot]
    b = beta if beta is not None else scales  # never read when HAS_BETA is False
    w = base if base is not None else state  # never read when HAS_BASE is False
    dtypes = [x.dtype, V.dtype, X.dtype, S.dtype] + ([] if base is None else [base.dtype])
    grid = (triton.cdiv(d, t.block_d), triton.cdiv(f, t.block_f))
    chunk_scan_fwd_kernel[grid](
        ws, x, state, w, V, X, b, scales, live,
        offsets.to(torch.int32).contiguous(), write_offsets.to(torch.int32).contiguous(),
        K, J, d, f, float(decay),
        *x.stride(), *state.stride(), *w.stride(), *V.stride(), *X.stride(), b.stride(0) if beta is not None else 0,
        HAS_BETA=beta is not None, HAS_BASE=base is not None, DOT=tlx.dot_dtype(*dtypes, interpret=interpret),
        BLOCK_C=t.block_t, BLOCK_D=t.block_d, BLOCK_F=t.block_f, num_warps=t.num_warps,
    )
    tlx.add_partials(y, ws)
    return norms
