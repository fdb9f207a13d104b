"""The gradient rule: ``v_t = -dL/dy_t`` for the next-token cross-entropy L of the chunk (dynamic evaluation on
down_proj, as a fast weight)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adapt_runtime.chunk import Chunk
from adapt_runtime.rules.base import Rule, Write, key_scale
from adapt_runtime.rules.steps import Steps, with_defaults

if TYPE_CHECKING:
    from adapt_runtime.architectures import ArchSpec
    from adapt_runtime.config import RuntimeConfig


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

    def __init__(self, **steps: Any) -> None:
        """``steps``: the step options every rule takes (``adapt_runtime.rules.steps.Steps``)."""
        self.steps = Steps(**with_defaults(self.defaults_for({}).steps, steps))

    def options(self) -> dict[str, Any]:
        return self.steps.options()

    def bind(self, model: nn.Module, arch: ArchSpec, config: RuntimeConfig) -> None:
        self.steps.check_layers(config.layers, config.state_rank)

    def write(self, chunk: Chunk) -> list[Write]:
        scale = key_scale([chunk.x[layer] for layer in chunk.layers])
        beta = torch.full((len(chunk),), chunk.lr, device=chunk.labels.device) / scale
        steps = None if self.steps.plain else self.steps
        return [Write(layer, -chunk.grads[layer], chunk.x[layer], beta, steps) for layer in chunk.layers]
