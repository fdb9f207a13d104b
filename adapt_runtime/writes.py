"""Applying one chunk's writes to a state: every plastic layer or none.

A chunk's write touches each plastic layer once (``kernels.write``, one slot per layer). The kernel refuses a
layer whose write norm is not finite and leaves that layer alone, so a write that overflowed on one layer only
would leave the layers before it written while the state counts the write as refused. So the whole write is
checked before any layer is touched, in float64 where nothing overflows: a bound on every float32 quantity the
kernels form (``beta_t v_t``, ``x_t``, every partial sum of ``V^T diag(beta) X``, its squared norm and the Gram
products of the Triton path) must stay below ``OVERFLOW_GUARD``; otherwise no layer is written.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from adapt_runtime import kernels
from adapt_runtime.rules import Write
from adapt_runtime.state import FastWeights

log = logging.getLogger("adapt_runtime")

# float32 holds 3.4e38; every quantity the kernels square stays below OVERFLOW_GUARD ** 2 = 1e36.
OVERFLOW_GUARD = 1e18


def write_bound(w: Write) -> Tensor:
    """A float64 upper bound (NaN if any input is) on the magnitudes the kernels form for write ``w``.

    With ``a_t = |beta_t| ||v_t||`` and ``b_t = ||x_t||``: every entry of every partial sum of
    ``sum_t beta_t v_t x_t^T`` and its Frobenius norm are at most ``sum_t a_t b_t``, and each Gram term
    ``(beta_t beta_s v_t.v_s)(x_t.x_s)`` at most ``a_t a_s b_t b_s``; so the largest of ``max a``, ``max b`` and
    ``sum a b`` bounds them all (``a``, ``b`` themselves, and ``sum a b`` for the sums and norms).
    """
    a = w.beta.double().abs() * torch.linalg.vector_norm(w.V.double(), dim=-1)
    b = torch.linalg.vector_norm(w.X.double(), dim=-1)
    if not a.numel():
        return torch.zeros((), dtype=torch.float64, device=a.device)
    return torch.stack([a.max(), b.max(), (a * b).sum()]).max()  # max propagates NaN


def writes_are_safe(s: FastWeights, writes: list[Write]) -> bool:
    """True when every layer's write stays below ``OVERFLOW_GUARD``; else the write is counted as refused and
    logged, and nothing may be written (the one check of the dense and the low-rank state)."""
    bound = torch.stack([write_bound(w).to(s.spec.device) for w in writes]).max()
    if bool(bound <= OVERFLOW_GUARD):  # NaN compares False: refused as well
        return True
    s.refused_writes += 1
    log.warning("refused a fast-weight write with non-finite or overflowing values (chunk %d); no layer was "
                "written", s.pending.chunk)
    return False


def apply_writes(s: FastWeights, writes: list[Write], decay: float, clip: float | None,
                 w0_norm: dict[int, float]) -> bool:
    """Write every layer of ``writes`` into ``s`` or none of them; count it (``writes`` or ``refused_writes``).

    Returns:
        True when the write was applied, False when it was refused (non-finite or overflowing inputs).
    """
    if not writes:
        return True
    if not writes_are_safe(s, writes):
        return False
    slot = torch.zeros(1, dtype=torch.long, device=s.spec.device)
    for w in writes:
        max_norm = None
        if clip is not None:
            max_norm = torch.tensor([clip * w0_norm[w.layer]], device=s.spec.device)
        S = s.delta(w.layer, create=True)
        if S.is_inference() and not torch.is_inference_mode_enabled() and not S._is_view():
            S = s.S[w.layer] = S.clone()  # made under inference_mode, written outside it (a slot's view stays put)
        kernels.write(S[None], slot, w.V[None], w.X[None], w.beta[None], decay, max_norm)
    s.writes += 1
    s.bump()
    return True
