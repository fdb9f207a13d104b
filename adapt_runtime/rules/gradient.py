"""The gradient rule: ``v_t = -dL/dy_t`` for the next-token cross-entropy L of the chunk (dynamic evaluation on
down_proj, as a fast weight)."""

from __future__ import annotations

from typing import Any

import torch

from adapt_runtime.chunk import Chunk
from adapt_runtime.rules.base import Rule, Write, key_scale


class GradientRule(Rule):
    """``S <- decay * S - lr / (n * mean||x||^2) * sum_t g_t x_t^T`` with ``g_t = dL/dy_t`` (see ``key_scale``).

    L is the chunk's summed next-token cross-entropy (its last position labelled by the first token of the next
    chunk); the runtime takes the gradient (``adapt_runtime.chunk_grad``) and hands it over in ``Chunk.grads``.
    """

    name = "gradient"
    needs_grad = True
    default_lr = 1.6
    default_chunk_size = 32
    default_norm_bound = 0.05  # long streams: unbounded, unseen text scored up to +11% vs fresh after 20k tokens

    def options(self) -> dict[str, Any]:
        return {}

    def write(self, chunk: Chunk) -> list[Write]:
        scale = key_scale([chunk.x[layer] for layer in chunk.layers])
        beta = torch.full((len(chunk),), chunk.lr, device=chunk.labels.device) / scale
        return [Write(layer, -chunk.grads[layer], chunk.x[layer], beta) for layer in chunk.layers]
