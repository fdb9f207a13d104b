"""The gradient rule: ``v_t = -dL/dy_t`` for the next-token cross-entropy L of the chunk (dynamic evaluation on
down_proj, as a fast weight)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adapt_runtime.rules.base import Rule, Write, key_scale
from adapt_runtime.state import FastWeights

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime


@contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd recording on, also inside ``torch.no_grad()`` and ``torch.inference_mode()`` (users call the
    runtime that way; the gradient rule's graph needs autograd inside it)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal(t: Tensor) -> Tensor:
    """``t``, or a normal copy of it if it was made under ``torch.inference_mode()`` (autograd cannot save an
    inference tensor for backward)."""
    return t.clone() if t.is_inference() else t


@dataclass
class ChunkGraph:
    """A chunk's forward with grad: logits `[n, V]`, per-layer inputs ``x`` `[n, f]` and zero probes `[n, d]`
    added to each down_proj output, so that ``dL/dy`` is ``autograd.grad(L, probes)``."""

    logits: Tensor
    x: dict[int, Tensor]
    probes: dict[int, Tensor]
    rows: Tensor | None = None  # the pending positions among the graph's rows (None: all of them)


class GradientRule(Rule):
    """``S <- decay * S - lr / (n * mean||x||^2) * sum_t g_t x_t^T`` with ``g_t = dL/dy_t`` (see ``key_scale``).

    L is the chunk's summed next-token cross-entropy (its last position labelled by the first token of the next
    chunk). Autograd runs to the down_proj outputs only: no weight gradients, and the KV of earlier chunks is
    detached. The graph is the chunk's own forward when the whole chunk was read in one call; otherwise the
    finished chunk is recomputed at the write, so the write is the same however the stream was fed.
    """

    name = "gradient"
    needs_grad = True
    default_lr = 1.6
    default_chunk_size = 32
    default_norm_bound = 0.05  # long streams: unbounded, unseen text scored up to +11% vs fresh after 20k tokens

    def options(self) -> dict[str, Any]:
        return {}

    def writes_for(self, rt: Runtime, state: FastWeights, next_token: int, graph: Any = None) -> list[Write]:
        if graph is None:
            graph = rt.recompute_chunk(state)
        with autograd_on():
            labels = self.labels_for(state, next_token)
            logits = graph.logits if graph.rows is None else graph.logits[graph.rows]
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            layers = list(state.spec.layers)
            grads = torch.autograd.grad(loss, [graph.probes[layer] for layer in layers])
        targets = {}
        for layer, g in zip(layers, grads):
            g = g.reshape(-1, g.shape[-1])
            X = graph.x[layer]
            if graph.rows is not None:
                g, X = g[graph.rows], X[graph.rows]
            targets[layer] = (-g.detach().float(), X.detach())
        scale = key_scale([X for _, X in targets.values()])
        beta = torch.full((len(labels),), rt.config.lr, device=labels.device) / scale
        return [Write(layer, V, X, beta) for layer, (V, X) in targets.items()]
