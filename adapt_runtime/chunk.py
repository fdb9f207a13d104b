"""``Chunk``: one row's finished chunk, the data a rule's ``write`` is a function of.

The runtime collects it (``adapt_runtime.chunk_collect``): what the plastic layers recorded at each position, the
per-position targets the rule's ``targets`` returned as labels arrived, and the gradient when the rule asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Chunk:
    """A finished chunk of one row's stream, ``n`` positions.

    Attributes:
        layers: the plastic layers, in order.
        x: per layer the keys `[n, f]`, the down projection's inputs (with ``needs_grad``: of the forward the
            gradient was taken on, the same values).
        labels: `[n]` next-token ids of the positions (the last one's is the first token after the chunk).
        tokens: `[n]` token ids at the positions.
        lr: the runtime's learning rate.
        y: per layer the outputs `[n, d]` (rules capturing ``y``), else empty.
        h: per layer the MLP's hidden input `[n, d]` (rules capturing ``h``), else empty.
        targets: what ``Rule.targets`` returned for the positions, by name, each `[m, *]` for the first ``m <= n``
            positions (those labelled while their logits were at hand).
        final_scale: `[n]` inverse RMS (LayerNorm: inverse std) of the residual entering the final norm (rules with
            ``reads_final_norm``), else None.
        grads: per layer ``dL/dy`` `[n, d]` for L the chunk's summed next-token cross-entropy under ``labels``
            (rules with ``needs_grad``), else empty.
    """

    layers: tuple[int, ...]
    x: dict[int, Tensor]
    labels: Tensor
    tokens: Tensor
    lr: float
    y: dict[int, Tensor] = field(default_factory=dict)
    h: dict[int, Tensor] = field(default_factory=dict)
    targets: dict[str, Tensor] = field(default_factory=dict)
    final_scale: Tensor | None = None
    grads: dict[int, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])
