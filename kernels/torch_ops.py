"""Fast-weight ops in vectorised PyTorch: the ``impl="torch"`` path, used on CPU and as the GPU baseline."""

from __future__ import annotations

import torch
from torch import Tensor

GATHER_LIMIT = 2**16  # elements per slot below which decode gathers the slots instead of looping over rows


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
        for r, slot in enumerate(slots.tolist()):
            y[r].add_(torch.mv(S[slot].to(acc), x[r].to(acc)).to(y.dtype))
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


def write_torch(
    S: Tensor,
    slots: Tensor,
    V: Tensor,
    X: Tensor,
    beta: Tensor | None = None,
    decay: float = 1.0,
    max_norm: Tensor | None = None,
) -> Tensor:
    v = V.float() if beta is None else V.float() * beta.float().unsqueeze(-1)
    update = torch.bmm(v.transpose(1, 2), X.float())  # [R, d, f], unclipped
    # the update is formed anyway, so its norm costs one read (the Gram form costs C^2 (d + f) FLOPs)
    norms = torch.linalg.vector_norm(update, dim=(1, 2))
    update.mul_(write_scales(norms, max_norm)[:, None, None])
    for r, (slot, finite) in enumerate(zip(slots.tolist(), torch.isfinite(norms).tolist())):
        if finite:
            target = S[slot]
            if target.dtype == torch.float32:  # decay 1 (the default) skips a pass over S: x * 1.0 == x exactly
                (target if decay == 1.0 else target.mul_(decay)).add_(update[r])
            else:  # one rounding to the state's dtype
                old = target.float()
                target.copy_((old if decay == 1.0 else old.mul_(decay)).add_(update[r]))
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
