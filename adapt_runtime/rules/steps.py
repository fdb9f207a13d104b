"""How a rule's chunk update becomes a step on S: the write form and the step options every rule may take.

A rule returns, per layer, the update ``U = V^T diag(beta) X`` of a chunk. By default (``Steps()``) that update is
written as it is, ``S <- decay * S + clip(U)``, exactly as before these options existed. The options:

* ``write_form="delta"``: the delta rule (DeltaNet; Irie & Gershman's fast-weight primer). The targets become
  ``v_t - erase * decay * S x_t``, the error of what the (decayed) old S already retrieves at each key, so a key
  written again overwrites instead of adding up: ``S <- decay * S (I - X^T diag(beta) X) + V^T diag(beta) X`` for
  ``erase=1``. Written by ``kernels.write``'s delta form. All positions of a chunk retrieve from the same S (the
  chunk's apply-then-update semantics), one step of gradient descent on ``sum_t beta_t / 2 ||S x_t - v_t||^2``.
* ``normalise=r``: a normalised step (dynamic evaluation's RMS-normalised update, Krause et al. 2019): each layer's
  update is rescaled to the Frobenius norm ``r * ||W0||_F``, so its RMS is ``r`` times W0's whatever the chunk's
  loss or the rule's rate (the rate's magnitude no longer matters; the per-token weights still do). The normaliser
  is the chunk's own RMS, not a running mean over a training set (a session has none).
* ``orthogonalise=True``: an orthogonalised step (Muon's quintic Newton-Schulz iteration, as LaCT and ATLAS use on
  their fast weights): the update's singular values are pushed to about one, then the result is scaled back to the
  update's Frobenius norm (with ``normalise``, to that norm instead). Done on the chunk's `C x C` Gram matrices
  (``newton_schulz``): every iterate stays ``A^T M B`` for the chunk's ``A = diag(beta) V``, ``B = X``, so the
  `[d, f]` update is never formed and the write stays a ``kernels.write`` of targets ``M^T A`` at keys ``X``.
* ``layer_rates=(r_0, ...)``: one factor per plastic layer (in layer order) on that layer's rates (with
  ``normalise``, on its step norm).
* ``momentum=mu``: heavy-ball momentum over chunks. A velocity ``M`` per layer (kept in the state, saved with it)
  takes the steps, ``M <- mu M + U``, and S takes the velocity, ``S <- decay S + clip(M)``.
* ``fast_decay=g`` (with ``consolidate=c``): two time scales. S is the sum of a fast part that decays by ``g`` per
  chunk and a slow part ``L`` (kept in the state, saved with it) that consolidates a fraction ``c`` of the fast part
  each chunk: ``S' = decay (L + g (S - L)) + step``, then ``L' = decay L + c (S' - decay L)``. The apply reads S
  alone, so the extra part costs memory, never time. ``c = 0`` leaves L at zero: a plain decay of ``g``.

Those with a state of their own (``extras``) name it ``momentum`` and ``slow``; the others need none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

WRITE_FORMS = ("plain", "delta")
# Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024): fast to a band of singular values around 1
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


@dataclass(frozen=True)
class Steps:
    """The step options of a rule (see the module docstring); the defaults write each update as it is."""

    write_form: str = "plain"
    erase: float = 1.0
    normalise: float | None = None
    orthogonalise: bool = False
    layer_rates: tuple[float, ...] | None = None
    momentum: float = 0.0
    fast_decay: float | None = None
    consolidate: float = 0.0

    def __post_init__(self) -> None:
        if self.write_form not in WRITE_FORMS:
            raise ValueError(f"write_form must be one of {WRITE_FORMS}, got {self.write_form!r}")
        if not (isinstance(self.erase, (int, float)) and math.isfinite(self.erase) and self.erase >= 0):
            raise ValueError(f"erase must be a finite number >= 0, got {self.erase!r}")
        object.__setattr__(self, "erase", float(self.erase))
        if self.write_form != "delta" and self.erase != 1.0:
            raise ValueError(f"erase applies to write_form='delta' only, got erase={self.erase} with the "
                             f"{self.write_form!r} form")
        if self.normalise is not None:
            if not (isinstance(self.normalise, (int, float)) and math.isfinite(self.normalise) and self.normalise > 0):
                raise ValueError(f"normalise must be a positive number (the step's norm relative to ||W0||) or "
                                 f"None, got {self.normalise!r}")
            object.__setattr__(self, "normalise", float(self.normalise))
        object.__setattr__(self, "orthogonalise", bool(self.orthogonalise))
        if self.layer_rates is not None:
            try:
                rates = tuple(float(r) for r in self.layer_rates)
            except (TypeError, ValueError):
                raise ValueError(f"layer_rates must be a list of numbers, got {self.layer_rates!r}") from None
            if not rates or not all(math.isfinite(r) and r >= 0 for r in rates):
                raise ValueError(f"layer_rates must be finite numbers >= 0, one per plastic layer, got {rates}")
            object.__setattr__(self, "layer_rates", rates)
        for name, high in (("momentum", 1.0), ("consolidate", 1.0 + 1e-12), ("fast_decay", 1.0 + 1e-12)):
            value = getattr(self, name)
            if value is None:
                continue
            if not (isinstance(value, (int, float)) and 0 <= value < high):
                raise ValueError(f"{name} must be a number in [0, {'1)' if high == 1.0 else '1]'}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.consolidate and self.fast_decay is None:
            raise ValueError("consolidate needs fast_decay (the two time scales)")

    @property
    def extras(self) -> tuple[str, ...]:
        """Names of the per-layer `[d, f]` tensors these steps keep in a state besides S."""
        return (("momentum",) if self.momentum else ()) + (("slow",) if self.fast_decay is not None else ())

    @property
    def plain(self) -> bool:
        """True when every option is at its default: the update is written as it is."""
        return self == Steps()

    def options(self) -> dict[str, Any]:
        """The options that differ from their defaults, JSON-able (a rule at the defaults records none, so its
        config and state files read exactly as before these options existed)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def check_layers(self, layers: tuple[int, ...], state_rank: int | None) -> None:
        """Raise ``ValueError`` unless these options fit the runtime's plastic ``layers`` and dense state."""
        if self.layer_rates is not None and len(self.layer_rates) != len(layers):
            raise ValueError(f"layer_rates has {len(self.layer_rates)} rates for {len(layers)} plastic layers "
                             f"{list(layers)}")
        if state_rank is not None and not self.plain:
            raise ValueError(f"the step options {sorted(self.options())} need a dense state (state_rank=None)")

    def rate(self, layers: tuple[int, ...], layer: int) -> float:
        """The factor on ``layer``'s rates (1 without ``layer_rates``)."""
        return 1.0 if self.layer_rates is None else self.layer_rates[layers.index(layer)]


def with_defaults(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A rule's step options: ``given`` over the rule's ``defaults``, key by key, except that a given
    ``write_form`` other than the default's takes the default ``erase`` away with the default form
    (``write_form="plain"`` keeps no stray ``erase``; ``erase=0.3`` alone keeps the default form)."""
    merged = {**defaults, **given}
    if given.get("write_form", defaults.get("write_form")) != defaults.get("write_form") and "erase" not in given:
        merged.pop("erase", None)
    return merged


def newton_schulz(A: Tensor, B: Tensor, steps: int = NS_STEPS) -> Tensor:
    """`[C, d]` targets ``T`` with ``T^T B`` the Newton-Schulz orthogonalisation of ``U = A^T B`` (``A [C, d]``,
    ``B [C, f]``), scaled to ``||U||_F``; float64.

    Muon's iteration ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` from ``X_0 = U / ||U||_F``. With ``X = A^T M B``:
    ``(X X^T) X = A^T P M B`` for ``P = M G_B M^T G_A`` (``G_A = A A^T``, ``G_B = B B^T``), so ``M`` (`C x C`) carries
    the whole iteration and ``T = M^T A``. A zero update stays zero; a non-finite one comes out non-finite.
    """
    A, B = A.double(), B.double()
    ga, gb = A @ A.T, B @ B.T
    sq = (ga * gb).sum()
    if not bool(torch.isfinite(sq)):
        return A * float("nan")  # non-finite stays non-finite: the write is refused
    if float(sq) <= 0:
        return A  # a zero update stays zero
    norm = sq.sqrt()
    a, b, c = NS_COEFFS
    M = torch.eye(A.shape[0], dtype=A.dtype, device=A.device) / norm
    for _ in range(steps):
        P = M @ gb @ M.T @ ga
        M = a * M + b * (P @ M) + c * (P @ (P @ M))
    out_sq = (M.T @ ga @ M * gb).sum()  # ||A^T M B||_F^2 = tr(M^T G_A M G_B)
    return (M.T @ A) * (norm / out_sq.clamp_min(1e-300).sqrt())
