"""``export_lora``: a session's fast weights as a PEFT LoRA adapter directory.

Each plastic layer's S is factored by a truncated SVD, ``S = U diag(s) V^T``, into ``lora_B = U_r diag(sqrt s_r)``
and ``lora_A = diag(sqrt s_r) V_r^T`` with ``lora_alpha = r`` (scaling 1). With ``rank=None``, or a rank at least
the state's numerical rank, the adapter is exact up to float rounding; with a smaller rank it is the best rank-r
approximation (Eckart-Young), and the relative Frobenius error ``||S - B A|| / ||S||`` of each layer is recorded in
the weights file's metadata (key ``adapt_runtime``) and returned.

Where the adapter's rank reaches ``min(d, f)`` (a layer of full numerical rank, the usual case once a session has
read more tokens than the layer's width), a factorisation saves nothing, and the layer is written as
``lora_B = I, lora_A = S`` (or ``lora_B = S, lora_A = I`` when ``f < d``): bit for bit exact, since ``I S`` in any
float arithmetic is S. The SVD factors are not: each is rounded to float32, so ``B A`` differs from S by about
``eps32 * sqrt(r) * ||S||`` (a last-place difference in ~40% of S's entries), which a deep model turns into logit
differences of ~1e-5 — an export/import round trip or PEFT then no longer reproduces the session exactly.

A rank-r runtime (``state_rank=r``) already holds each layer's S as factors ``B [d, k] A [k, f]`` (``k <= r``), and
they are written as they are, with no SVD of S: ``lora_B = B``, ``lora_A = A`` (zero-padded to the adapter's rank,
the largest ``k``; scaling 1), exact bit for bit, and the runtime applies them as PEFT does, ``B (A x)``. A
``rank`` below a layer's ``k`` takes the best rank-``rank`` factors of ``B A`` (``lowrank.truncate``: thin QRs and
the SVD of the small core, never the `[d, f]` product).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from adapt_runtime.atomic import atomic_write
from adapt_runtime.lora_format import (
    CONFIG_NAME,
    METADATA_KEY,
    WEIGHTS_NAME,
    base_model_name,
    layer_fingerprints,
    module_name,
    weight_key,
)
from adapt_runtime.lowrank import truncate
from adapt_runtime.state import FastWeights

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime


@dataclass(frozen=True)
class LoraExport:
    """What ``export_lora`` wrote.

    Attributes:
        rank: the adapter's ``r`` (one rank for every layer; layers of lower rank are zero-padded).
        numerical_rank: per plastic layer, the numerical rank of S: singular values above ``s_max * eps`` of the
            state dtype (0 for S = 0).
        rel_error: per plastic layer, ``||S - B A||_F / ||S||_F`` in exact arithmetic (0.0 for S = 0 and for a layer
            written as ``I S``; otherwise at the full numerical rank only the singular values below float rounding
            of S are left out, about 1e-6 or less).
        files: file name -> bytes (``adapter_config.json``, ``adapter_model.safetensors``).
    """

    rank: int
    numerical_rank: dict[int, int]
    rel_error: dict[int, float]
    files: dict[str, bytes]


@dataclass(frozen=True)
class _Factors:
    B: Tensor  # [d, k]
    A: Tensor  # [k, f]
    singular: Tensor  # all singular values, descending
    numerical_rank: int


def _svd(S: Tensor | None, shape: tuple[int, int], state_dtype: torch.dtype) -> _Factors:
    d, f = shape
    if S is None:
        empty = torch.zeros(0, dtype=torch.float64)
        return _Factors(torch.zeros(d, 0, dtype=torch.float64), torch.zeros(0, f, dtype=torch.float64), empty, 0)
    U, s, Vh = torch.linalg.svd(S.detach().to("cpu", torch.float64), full_matrices=False)
    tol = float(s[0]) * torch.finfo(state_dtype).eps if s.numel() else 0.0  # what S's own rounding can resolve
    k = int((s > tol).sum())
    root = s[:k].sqrt()
    return _Factors(U[:, :k] * root, root[:, None] * Vh[:k], s, k)


def _rel_error(s: Tensor, kept: int) -> float:
    total = float(s.pow(2).sum())
    if total == 0.0 or kept >= s.numel():
        return 0.0
    return math.sqrt(float(s[kept:].pow(2).sum()) / total)


def _exact(S: Tensor | None, r: int, d: int, f: int) -> tuple[Tensor, Tensor]:
    """``(B, A)`` of rank ``r >= min(d, f)`` with ``B A == S`` exactly: an identity on the smaller side, S itself
    (its float32 values, exact for every state dtype) on the other."""
    B, A = torch.zeros(d, r, dtype=torch.float32), torch.zeros(r, f, dtype=torch.float32)
    S = torch.zeros(d, f, dtype=torch.float32) if S is None else S.detach().to("cpu", torch.float32)
    if d <= f:
        B[:, :d] = torch.eye(d)
        A[:d] = S
    else:
        A[:, :f] = torch.eye(f)
        B[:, :f] = S
    return B, A


def _padded(t: Tensor, rows: int, cols: int) -> Tensor:
    out = torch.zeros(rows, cols, dtype=torch.float32)
    out[: t.shape[0], : t.shape[1]] = t.to(torch.float32)
    return out


def _held_singular(pair: tuple[Tensor, Tensor], state_dtype: torch.dtype) -> tuple[Tensor, int]:
    """The singular values of ``S = B A`` (descending) and its numerical rank, from the SVD of the `[k, k]` core
    ``R_B R_A^T`` of the thin QRs of ``B`` and ``A^T`` (float64; the product is never formed)."""
    B, A = (t.detach().to("cpu", torch.float64) for t in pair)
    s = torch.linalg.svdvals(torch.linalg.qr(B, mode="r")[1] @ torch.linalg.qr(A.T, mode="r")[1].T)
    tol = float(s[0]) * torch.finfo(state_dtype).eps if s.numel() else 0.0
    return s, int((s > tol).sum())


def _held_factors(rt: Runtime, state: FastWeights, rank: int | None
                  ) -> tuple[int, dict[int, tuple[Tensor, Tensor]], dict[int, int], dict[int, float]]:
    """A rank-r runtime's adapter: each layer's factors as held (zero-padded to the largest ``k``), or their best
    rank-``rank`` truncation where ``rank`` is below a layer's ``k``."""
    spec = rt.state_spec
    held = {layer: state.factors.get(layer) for layer in spec.layers}
    width = max((pair[0].shape[1] for pair in held.values() if pair is not None), default=0)
    r = max(1, width if rank is None else min(rank, width))
    out, numerical, errors = {}, {}, {}
    for layer, (d, f) in zip(spec.layers, spec.shapes):
        pair, errors[layer], numerical[layer] = held[layer], 0.0, 0
        if pair is None:
            out[layer] = (torch.zeros(d, r), torch.zeros(r, f))
            continue
        singular, numerical[layer] = _held_singular(pair, spec.dtype)
        B, A = (t.detach().to("cpu", torch.float32) for t in pair)
        if B.shape[1] > r:
            B, A = truncate(B, A, r)
            errors[layer] = _rel_error(singular, r)
        out[layer] = (_padded(B, d, r), _padded(A, r, f))
    return r, out, numerical, errors


def _svd_factors(rt: Runtime, state: FastWeights, rank: int | None
                 ) -> tuple[int, dict[int, tuple[Tensor, Tensor]], dict[int, int], dict[int, float]]:
    """A dense S's adapter: ``I S`` at full rank, else the (truncated) SVD factors (see the module docstring)."""
    spec = rt.state_spec
    factors = {layer: _svd(state.S[layer], shape, spec.dtype) for layer, shape in zip(spec.layers, spec.shapes)}
    state_rank = max(fa.numerical_rank for fa in factors.values())
    r = max(1, state_rank if rank is None else min(rank, state_rank))
    out: dict[int, tuple[Tensor, Tensor]] = {}
    errors: dict[int, float] = {}
    for layer, (d, f) in zip(spec.layers, spec.shapes):
        fa = factors[layer]
        if r >= min(d, f):  # no smaller than S itself: B A = S exactly
            errors[layer] = 0.0
            out[layer] = _exact(state.S[layer], r, d, f)
        else:
            kept = min(r, fa.numerical_rank)
            errors[layer] = _rel_error(fa.singular, kept)
            out[layer] = (_padded(fa.B[:, :kept], d, r), _padded(fa.A[:kept], r, f))
    return r, out, {layer: fa.numerical_rank for layer, fa in factors.items()}, errors


def lora_files(rt: Runtime, state: FastWeights, rank: int | None = None) -> LoraExport:
    """The adapter's files in memory (see ``export_lora``)."""
    if state.spec is not rt.state_spec:
        raise ValueError("state was made by another runtime; use rt.new_state() or ar.load_state(path, rt)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    spec = rt.state_spec
    make = _svd_factors if spec.state_rank is None else _held_factors
    r, factors, numerical, errors = make(rt, state, rank)
    tensors: dict[str, Tensor] = {}
    for layer in spec.layers:
        name = module_name(rt, layer)
        tensors[weight_key(name, "lora_A.weight")] = factors[layer][1]
        tensors[weight_key(name, "lora_B.weight")] = factors[layer][0]
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name(rt),
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [module_name(rt, layer) for layer in spec.layers],
        "fan_in_fan_out": bool(rt.arch.conv1d),
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    meta = {
        "w0_sha256": {str(k): v for k, v in layer_fingerprints(rt).items()},
        "rule": spec.rule,
        "layers": list(spec.layers),
        "requested_rank": rank,
        "state_rank": spec.state_rank,
        "rank": r,
        "numerical_rank": {str(k): v for k, v in numerical.items()},
        "rel_frobenius_error": {str(k): v for k, v in errors.items()},
        "tokens_seen": state.tokens_seen,
        "writes": state.writes,
    }
    weights = st_save({k: v.contiguous() for k, v in tensors.items()},
                      metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    files = {CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(), WEIGHTS_NAME: weights}
    return LoraExport(rank=r, numerical_rank=numerical, rel_error=errors, files=files)


def export_lora(rt: Runtime, state: FastWeights, path: str | Path, rank: int | None = None) -> LoraExport:
    """Write ``state``'s fast weights as a PEFT LoRA adapter directory at ``path`` (created if needed).

    Args:
        rt: the runtime the state belongs to.
        state: the session state; only S is exported (a pending, not yet written chunk is not part of S).
        path: the adapter directory (``adapter_config.json`` and ``adapter_model.safetensors``).
        rank: None for an exact adapter (rank = the state's numerical rank; for a rank-r runtime, the largest rank
            its factors hold), else at most this rank.

    Returns:
        A ``LoraExport`` with the rank, each layer's numerical rank and relative Frobenius error.

    Example:
        >>> info = export_lora(rt, state, "memory-adapter", rank=8)
        >>> # vllm serve <base model> --enable-lora --lora-modules memory=memory-adapter
    """
    result = lora_files(rt, state, rank)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in result.files.items():
        atomic_write(folder / name, data)
    return result
