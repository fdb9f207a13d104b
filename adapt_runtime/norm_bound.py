"""The state-norm bound of long sessions: each layer's ``||S||`` held at most ``bound * ||W0||`` by rescaling.

A clip bounds each write; over a long stream the writes still add up, and past some norm the fast weights make
unseen text worse than no adaptation at all (``benchmarks/long_memory_sweep.py``). With ``norm_bound`` set, a
write that takes a layer's S past its bound is kept and S is scaled back onto the bound: the newest write keeps
its full weight and everything older shrinks, a forgetting that acts only when the state is full.
"""

from __future__ import annotations

import torch

from adapt_runtime.state import FastWeights


def bound_norms(s: FastWeights, bound: float | None, w0_norm: dict[int, float]) -> None:
    """Rescale each layer's S of ``s`` onto ``bound * ||W0||`` where it is larger (in place; None: no bound)."""
    if bound is None:
        return
    layers = [layer for layer, S in s.S.items() if S is not None]
    if not layers:
        return
    # every layer's norm first, then one read of them all (one host sync per write, not one per layer)
    norms = torch.stack([torch.linalg.vector_norm(s.S[layer], dtype=torch.float32) for layer in layers]).tolist()
    changed = False
    for layer, norm in zip(layers, norms):
        limit = bound * w0_norm[layer]
        if norm > limit:
            s.before_change(s.S[layer])
            s.S[layer].mul_(limit / norm)
            slow = s.extra.get("slow", {}).get(layer)  # two time scales: the slow part is part of S
            if slow is not None:
                s.before_change(slow)
                slow.mul_(limit / norm)
            changed = True
    if changed:
        s.bump()
