"""The learned rule's write of one finished chunk, as tensors: the one definition that the training forward
(``adapt_runtime.train.forward``, with autograd through it) and the runtime's ``learned`` rule (``rules/learned.py``,
on detached tensors) both call, so that serving a trained checkpoint computes what training computed.

Shapes carry a leading row dimension ``B`` (the runtime passes one row). The formulas are in
``adapt_runtime.train.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapt_runtime.train.config import PlasticityConfig
from adapt_runtime.train.params import RuleParams


@dataclass
class ChunkInputs:
    """What a finished chunk of ``n`` positions offers the rule, per plastic layer (each `[B, n, *]`).

    Attributes:
        x: the keys, the down projection's inputs `[B, n, f]`.
        y: the down projection's outputs `[B, n, d]` (target ``output``), else empty.
        h: the MLP's inputs `[B, n, d]` (modulation ``gate``), else empty.
        retrieved: ``S_i x_t`` `[B, n, d]` (form ``delta``), else empty.
        grads: ``dL/dy`` `[B, n, d]` of the chunk's summed next-token loss (form ``gradient``), else empty.
        targets: ``position_targets`` of the positions: ``v`` `[B, n, d]`, ``nll`` `[B, n]`.
    """

    x: dict[int, Tensor]
    y: dict[int, Tensor] = field(default_factory=dict)
    h: dict[int, Tensor] = field(default_factory=dict)
    retrieved: dict[int, Tensor] = field(default_factory=dict)
    grads: dict[int, Tensor] = field(default_factory=dict)
    targets: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class LayerUpdate:
    """``S <- decay * S + alpha . (V^T diag(beta) X)`` for each row: decay `[B]`, V `[B, n, d]`, X `[B, n, f]`,
    beta `[B, n]`, alpha `[d, f]` or None."""

    decay: Tensor
    V: Tensor
    X: Tensor
    beta: Tensor
    alpha: Tensor | None = None

    def dense(self) -> Tensor:
        """The write ``alpha . (V^T diag(beta) X)`` `[B, d, f]`."""
        U = torch.einsum("bnd,bnf->bdf", self.V * self.beta[..., None], self.X)
        return U if self.alpha is None else U * self.alpha

    def apply(self, S: Tensor) -> Tensor:
        """``decay * S + U`` `[B, d, f]` (differentiable; ``S`` is not modified)."""
        return self.decay[:, None, None] * S + self.dense()


def position_targets(config: PlasticityConfig, unembed: Tensor, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-position tensors from the logits `[..., V]` and next-token labels `[...]`: ``v`` (targets ``error`` and
    ``next_token`` of the hebbian and delta forms) and ``nll`` (modulation ``surprise``)."""
    out: dict[str, Tensor] = {}
    log_p = None
    if config.form != "gradient" and config.target != "output":
        U = unembed.to(logits.dtype)
        v = U[labels]
        if config.target == "error":
            log_p = torch.log_softmax(logits, dim=-1)
            v = v - log_p.exp() @ U
        out["v"] = v
    if config.modulation == "surprise":
        log_p = torch.log_softmax(logits, dim=-1) if log_p is None else log_p
        out["nll"] = -log_p.gather(-1, labels[..., None]).squeeze(-1)
    return out


def key_scales(keys: list[Tensor]) -> Tensor:
    """`[B]` ``n * mean ||x||^2`` over each row's keys in all plastic layers (``keys``: `[B, n, f]` per layer), the
    divisor of the normalised rate, as ``adapt_runtime.rules.base.key_scale`` for one row."""
    mean_sq = torch.stack([X.pow(2).sum(-1).mean(-1) for X in keys]).mean(0)
    return (keys[0].shape[1] * mean_sq).clamp_min(1e-12)


def delta_clip(values: list[Tensor], keys: list[Tensor], max_norm: float = 1.0) -> Tensor:
    """`[B, n]` ``min(1, max_norm / ||Delta_t||)``, ``||Delta_t||^2 = sum_l ||v_lt||^2 ||x_lt||^2 (+1e-8)``: the norm of
    each position's outer products ``v_lt x_lt^T`` over all plastic layers together (Chaudhary 2025's clip)."""
    sq = sum(V.pow(2).sum(-1) * X.pow(2).sum(-1) for V, X in zip(values, keys))
    return (max_norm / (torch.sqrt(sq + 1e-8) + 1e-8)).clamp(max=1.0)


def chunk_updates(params: RuleParams, inputs: ChunkInputs, lr: float = 1.0) -> dict[int, LayerUpdate]:
    """Each plastic layer's update from one finished chunk (``lr`` multiplies every rate; the runtime's ``lr``)."""
    config = params.config
    values = {}
    for i in config.layers:
        if config.form == "gradient":
            V = -inputs.grads[i]
        else:
            V = inputs.y[i] if config.target == "output" else inputs.targets["v"]
            if config.form == "delta":
                V = V - inputs.retrieved[i]
        values[i] = V
    if config.norm == "delta":
        clip = delta_clip([values[i] for i in config.layers], [inputs.x[i] for i in config.layers])  # [B, n]
        scale = torch.ones_like(clip[:, 0])
    else:
        clip = None
        scale = key_scales([inputs.x[i] for i in config.layers])  # [B]
    updates = {}
    for i in config.layers:
        X, V = inputs.x[i], values[i]
        rows, n = X.shape[0], X.shape[1]
        if config.modulation == "gate":
            m = params.gate(i, inputs.h[i])  # [B, n]
        elif config.modulation == "surprise":
            nll = inputs.targets["nll"]
            m = nll / nll.mean(-1, keepdim=True).clamp_min(1e-6)
        else:
            m = torch.ones(rows, n, dtype=X.dtype, device=X.device)
        if clip is not None:
            m = m * clip
        decay = params.decay(i).expand(rows)
        if config.modulation == "gate":
            decay = decay * (1 - m.mean(-1))
        beta = (lr * params.rate(i)) * m / scale[:, None]
        updates[i] = LayerUpdate(decay, V, X, beta, params.connection(i))
    return updates
