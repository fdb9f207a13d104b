"""Fast-weight ops in vectorised PyTorch: the ``impl="torch"`` path, used on CPU and as the GPU baseline."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

GATHER_LIMIT = 2**16  # elements per slot below which decode gathers the slots instead of looping over rows

_POOL: dict[int, ThreadPoolExecutor] = {}  # by worker count: the threads that share a decode's rows


def _row_workers(rows: int, *tensors: Tensor) -> int:
    """How many threads share a CPU decode's per-row matrix-vector products: one per torch thread (at most one per
    row), or 1 on a GPU and while autograd records. Each product streams one slot of S; MKL's threaded gemv reads
    about 19 GB/s on this project's 2-core CPU, and two of them run side by side read 29 GB/s, what a plain
    ``sum`` reads (measured over 64 slots of 1024 x 4096)."""
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if rows < 2 or recording or tensors[0].device.type != "cpu":
        return 1
    return min(rows, torch.get_num_threads())


def _rows_in_threads(work, rows: list[int], workers: int) -> None:
    """``work(part)`` over ``rows`` split into ``workers`` interleaved parts, one in this thread, the others in a
    pool; the caller's inference mode carries over (it is thread-local)."""
    pool = _POOL.get(workers)
    if pool is None:
        pool = _POOL[workers] = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="adapt-apply")
    inference = torch.is_inference_mode_enabled()

    def run(part: list[int]) -> None:
        with torch.inference_mode(inference):
            work(part)

    futures = [pool.submit(run, rows[k::workers]) for k in range(1, workers)]
    work(rows[0::workers])
    for future in futures:
        future.result()


def apply_torch(y: Tensor, x: Tensor, S: Tensor, slots: Tensor, offsets: Tensor | None = None) -> Tensor:
    # accumulate in float32 at least (a bfloat16 S is read exactly, never x rounded to it), like the merged W0 + S
    acc = torch.promote_types(S.dtype, torch.float32)
    if offsets is None and S.shape[1] * S.shape[2] < GATHER_LIMIT:
        # decode with small slots: gather each row's slot and do one bmm
        delta = torch.bmm(x.unsqueeze(1).to(acc), S[slots].to(acc).transpose(1, 2)).squeeze(1)
        y.add_(delta.to(y.dtype))
        return y
    if offsets is None:
        # decode with large slots: a gather would copy every row's slot (measured 10x slower at 512 x 1792)
        listed = slots.tolist()

        def rows_of(part: list[int]) -> None:
            for r in part:
                y[r].add_(torch.mv(S[listed[r]].to(acc), x[r].to(acc)).to(y.dtype))

        workers = _row_workers(len(listed), y, x, S)
        if workers > 1:
            _rows_in_threads(rows_of, list(range(len(listed))), workers)
        else:
            rows_of(list(range(len(listed))))
        return y
    bounds = offsets.tolist()
    for r, slot in enumerate(slots.tolist()):
        start, end = bounds[r], bounds[r + 1]
        if end > start:
            y[start:end].add_((x[start:end].to(acc) @ S[slot].to(acc).T).to(y.dtype))
    return y


def write_scales(norms: Tensor, max_norm: Tensor | None) -> Tensor:
    """Per-row factor applied to the write: the Frobenius clip, and 0 for a non-finite write."""
    scale = torch.ones_like(norms)
    if max_norm is not None:
        bound = max_norm.to(norms)
        scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), scale)
    return torch.where(torch.isfinite(norms), scale, torch.zeros_like(scale))


def write_norms(V: Tensor, X: Tensor, beta: Tensor | None = None) -> Tensor:
    """``||V_r^T diag(beta_r) X_r||_F`` per row `[R]` from the Gram products (float64, then float32): ``C^2 (d + f)``
    FLOPs instead of forming the `[d, f]` update. NaN when any input is not finite."""
    v = V.double() if beta is None else V.double() * beta.double().unsqueeze(-1)
    x = X.double()
    sq = (torch.bmm(v, v.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum(dim=(1, 2))
    # rounding can leave a tiny negative sum for a near-zero update; NaN stays NaN through clamp_min
    return sq.clamp_min(0).sqrt().float()


def gram_norm_pays(C: int, d: int, f: int) -> bool:
    """Whether the float64 Gram norm (``C^2 (d + f)`` FLOPs at about 4x a float32 FLOP) costs less than forming
    the `[d, f]` update (``C d f``) and the passes over it: true for decode-sized chunks at real widths (C=16 at
    1024 x 4096: one write 1.8 ms instead of 3.6), false for long chunks of narrow layers (C=256 at 512 x 1536:
    12.5 ms instead of 4.3; one thread, this project's CPU)."""
    return 4 * C * (d + f) <= d * f


def delta_targets(S: Tensor, slots: Tensor, V: Tensor, X: Tensor, erase: float) -> Tensor:
    """The delta form's targets `[R, C, d]` float32, ``V_r - erase * X_r S[slots[r]]^T``: each target less what the
    old S already retrieves at its key (one product per row with its own slot; no gather of the slots)."""
    acc = torch.promote_types(S.dtype, torch.float32)
    out = V.float().clone()
    for r, slot in enumerate(slots.tolist()):
        out[r].sub_((X[r].to(acc) @ S[slot].to(acc).T).float(), alpha=erase)
    return out


def write_torch(
    S: Tensor,
    slots: Tensor,
    V: Tensor,
    X: Tensor,
    beta: Tensor | None = None,
    decay: float = 1.0,
    max_norm: Tensor | None = None,
    erase: float = 0.0,
) -> Tensor:
    if erase:
        V = delta_targets(S, slots, V, X, erase)
    v = V.float() if beta is None else V.float() * beta.float().unsqueeze(-1)
    if gram_norm_pays(V.shape[1], S.shape[1], S.shape[2]):
        # the norm from the Gram products, so a float32 slot is written by one addmm_ in place (one read and one
        # write of S; forming the update, taking its norm, scaling it and adding it takes four passes more)
        norms = write_norms(V, X, beta)
        updates = None
    else:
        updates = torch.bmm(v.transpose(1, 2), X.float())  # [R, d, f], unclipped
        norms = torch.linalg.vector_norm(updates, dim=(1, 2))
    scales = write_scales(norms, max_norm)
    for r, (slot, finite) in enumerate(zip(slots.tolist(), torch.isfinite(norms).tolist())):
        if not finite:
            continue
        target = S[slot]
        old = target if target.dtype == torch.float32 else target.float()  # else one rounding to the state's dtype
        if updates is None:
            old.addmm_((v[r] * scales[r]).T, X[r].float(), beta=decay)  # decay * S + update (decay 1: no scaling)
        else:
            (old if decay == 1.0 else old.mul_(decay)).add_(updates[r].mul_(scales[r]))
        if old is not target:
            target.copy_(old)
    return norms


def apply_write_torch(
    y: Tensor,
    x: Tensor,
    S: Tensor,
    slot: int,
    V: Tensor,
    beta: Tensor | None = None,
    decay: float = 1.0,
    max_norm: float | None = None,
) -> Tensor:
    acc = torch.promote_types(S.dtype, torch.float32)
    y.add_((x.to(acc) @ S[slot].to(acc).T).to(y.dtype))
    bound = None if max_norm is None else torch.tensor([max_norm], dtype=torch.float32, device=S.device)
    slots = torch.tensor([slot], device=S.device)
    b = None if beta is None else beta[None]
    return write_torch(S, slots, V[None], x[None], b, decay, bound)[0]


def chunk_scan_torch(
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
    # one float32 copy of the slot carried across the span (the slot itself when it is float32), written back once
    acc = torch.promote_types(S.dtype, torch.float32)
    target = S[slot]
    state = target if target.dtype == acc else target.to(acc)
    # buffers made once: a fresh [d, f] tensor per piece costs as much as the piece's matmul on a CPU (page faults)
    weight = None if base is None else torch.empty(state.shape, dtype=acc, device=S.device)
    update_buffer: Tensor | None = None
    bounds, wbounds = offsets.tolist(), write_offsets.tolist()
    J = len(wbounds) - 1
    norms = torch.empty(J, dtype=torch.float32, device=S.device)
    for k in range(len(bounds) - 1):
        a, e = bounds[k], bounds[k + 1]
        if e > a:
            w = state if weight is None else torch.add(base, state, out=weight)  # base + S_k: one matmul per piece
            if y.dtype == acc and x.dtype == acc:
                y[a:e].addmm_(x[a:e], w.T)
            else:
                y[a:e].add_((x[a:e].to(acc) @ w.T).to(y.dtype))
        if k >= J:
            continue
        p, q = wbounds[k], wbounds[k + 1]
        v = V[p:q].to(acc) if beta is None else V[p:q].to(acc) * beta[p:q].to(acc)[:, None]
        keys = X[p:q].to(acc)
        if gram_norm_pays(q - p, state.shape[0], state.shape[1]):
            norm = write_norms(V[None, p:q], X[None, p:q], None if beta is None else beta[None, p:q])[0]
            update = None
        else:
            if update_buffer is None:
                update_buffer = torch.empty(state.shape, dtype=acc, device=S.device)
            update = torch.mm(v.T, keys, out=update_buffer)
            norm = torch.linalg.vector_norm(update)
        norms[k] = norm
        value = float(norm)
        if not math.isfinite(value):
            continue  # refused: S_{k+1} = S_k
        scale = 1.0 if max_norm is None or value <= max_norm else max_norm / max(value, 1e-30)
        if update is None:
            state.addmm_(v.T, keys, beta=decay, alpha=scale)
        else:
            (state if decay == 1.0 else state.mul_(decay)).add_(update, alpha=scale)
    if state is not target:
        target.copy_(state)
    return norms
