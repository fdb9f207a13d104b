"""The rule interface. A rule decides the targets ``v_t`` and rates ``beta_t`` of the one write op
``S <- decay * S + clip(V^T diag(beta) X)``; the runtime does the rest (chunking, capture, the write itself)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from adapt_runtime.state import FastWeights

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime


@dataclass
class Segment:
    """What one row produced in one model call, handed to ``Rule.observe``.

    Attributes:
        records: per plastic layer, the captured tensors (``x`` `[n, f]`, ``y`` `[n, d]`, ``h`` `[n, d]`).
        logits: `[n, V]` logits of the segment's positions.
        labels: `[n]` next-token ids, -1 where the next token is not known yet (the last fed position).
        final_inv_rms: `[n]` inverse RMS (LayerNorm: inverse std) of the residual entering the final norm, when
            the rule asked for it with ``reads_final_norm``.
    """

    records: dict[int, dict[str, Tensor]]
    logits: Tensor
    labels: Tensor
    final_inv_rms: Tensor | None = None


@dataclass
class Write:
    """One layer's write: ``S[layer] <- decay * S + clip(V^T diag(beta) X)``."""

    layer: int
    V: Tensor  # [n, d]
    X: Tensor  # [n, f]
    beta: Tensor  # [n]


def key_scale(keys: list[Tensor]) -> Tensor:
    """``n * mean ||x||^2`` over a chunk's keys in all plastic layers: the divisor of a normalised rate.

    One scale shared by the layers keeps plain SGD's relative layer rates (upper layers, with larger keys, take
    larger steps), while the per-token mean and the key norm make one ``lr`` fit any chunk size and model width.
    """
    mean_sq = torch.stack([X.float().pow(2).sum(-1).mean() for X in keys]).mean()
    return (keys[0].shape[0] * mean_sq).clamp_min(1e-12)


class Rule:
    """Base rule. Subclasses set ``name`` and the defaults, and implement ``observe`` and/or ``writes_for``."""

    name: ClassVar[str] = "base"
    capture: frozenset[str] = frozenset()
    needs_grad: ClassVar[bool] = False
    reads_final_norm: bool = False
    writes: ClassVar[bool] = True
    default_lr: ClassVar[float] = 0.0
    default_chunk_size: ClassVar[int] = 32
    default_layers: ClassVar[str | tuple[int, ...]] = "all"
    default_decay: ClassVar[float] = 1.0
    default_clip: ClassVar[float | None] = None
    default_norm_bound: ClassVar[float | None] = None

    def options(self) -> dict[str, Any]:
        """Rule-specific options, JSON-able (recorded in the config and in state files)."""
        return {}

    def bind(self, rt: Runtime) -> None:
        """Called once by ``patch``: a chance to check the model and cache what the rule reads from it."""

    def observe(self, rt: Runtime, state: FastWeights, segment: Segment) -> None:
        """Called after each adapted segment of a row, once its records are in ``state.pending``."""

    def observe_rows(self, rt: Runtime, states: list[FastWeights], segments: list[Segment]) -> None:
        """``observe`` for every row of a call; rules may override it to do all rows in one batched step."""
        for state, segment in zip(states, segments):
            self.observe(rt, state, segment)

    def resolve(self, rt: Runtime, state: FastWeights, next_token: int) -> None:
        """Called when ``next_token`` is fed: the pending position before it now has its label."""

    def resolve_rows(self, rt: Runtime, states: list[FastWeights], next_tokens: list[int]) -> None:
        """``resolve`` for every row of a call; rules may override it to do all rows in one batched step."""
        for state, token in zip(states, next_tokens):
            self.resolve(rt, state, token)

    def writes_for(self, rt: Runtime, state: FastWeights, next_token: int, graph: Any = None) -> list[Write]:
        """The writes of the completed pending chunk of ``state``; ``next_token`` labels its last position."""
        return []

    @staticmethod
    def labels_for(state: FastWeights, next_token: int) -> Tensor:
        """Next-token labels of the pending positions (the stream, then ``next_token`` past its end)."""
        stream = state.tokens
        labels = [stream[p + 1] if p + 1 < len(stream) else next_token for p in state.pending.positions]
        return torch.tensor(labels, dtype=torch.long, device=state.spec.device)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class NoneRule(Rule):
    """No write: the patched model equals the base model."""

    name = "none"
    writes = False
