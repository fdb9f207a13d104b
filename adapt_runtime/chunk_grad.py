"""The gradient of a chunk's next-token loss w.r.t. each plastic layer's output, for rules that declare
``needs_grad``: the runtime takes it here and hands it to the rule in the ``Chunk``; rules never run autograd.

The graph is the chunk's own forward when the whole chunk was read in one call; otherwise the finished chunk is
recomputed at the write (``recompute``), so the gradient is the same however the stream was fed. Autograd runs to
the down_proj outputs only: no weight gradients, and the KV of earlier chunks is detached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from adapt_runtime.plastic import Binding
    from adapt_runtime.state import FastWeights


@contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd recording on, also inside ``torch.no_grad()`` and ``torch.inference_mode()`` (users call the
    runtime that way; the chunk's graph needs autograd inside it)."""
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


def graph_of(logits: Tensor, bindings: dict[int, Binding], row: int, rows: Tensor | None = None) -> ChunkGraph:
    """Row ``row``'s graph of a call made with ``grad_probe`` bindings (``logits`` `[B, n, V]` of the call; the row's
    logits keep their graph under no_grad / inference_mode)."""
    with autograd_on():
        return ChunkGraph(logits[row], {i: b.records["x"][row] for i, b in bindings.items()},
                          {i: b.records["probe"] for i, b in bindings.items()}, rows)


Call = Callable[[Tensor, "list[FastWeights]", frozenset, bool], "tuple[Tensor, dict[int, Binding]]"]


def recompute(call: Call, s: FastWeights) -> ChunkGraph:
    """The pending chunk's forward again, with grad, on the KV prefix before it and the same S (``call`` is the
    runtime's model call: ids, states, capture, grad -> logits and bindings).

    It re-reads the pending positions' span of the stream alone, ``[first, last]``: at most one chunk, whatever
    the stream holds after it (tokens fed with ``adapt=False``, or a forged state), since the logits of those
    positions depend on nothing later. A span longer than one chunk is refused: no row's write may cost more
    than one chunk's forward and backward on the model thread."""
    from adapt_runtime.state import FastWeights  # the state module imports the chunk module, which imports this one

    positions = s.pending.positions
    first, last = positions[0], positions[-1]
    if last - first + 1 > s.spec.chunk_size:
        raise RuntimeError(f"pending positions [{first}, {last}] span more than one chunk of {s.spec.chunk_size}; "
                           "refusing to recompute them")
    ids_list = s.token_span(first, last + 1)
    back = s.tokens_seen - first
    keep = max(0, s.kv_len - back)
    tmp = FastWeights(s.spec)
    tmp.S, tmp.factors, tmp.version = s.S, s.factors, s.version
    if keep:
        tmp.kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in s.kv or []]
        tmp.kv_tokens = keep
    device = s.spec.device
    ids = torch.tensor([ids_list], device=device)
    logits, bindings = call(ids, [tmp], frozenset({"x"}), True)
    with autograd_on():
        rows = torch.tensor([p - first for p in s.pending.positions], device=device)
    return graph_of(logits, bindings, 0, rows)


def gradients(graph: ChunkGraph, labels: Tensor, layers: tuple[int, ...]) -> tuple[dict[int, Tensor],
                                                                                     dict[int, Tensor]]:
    """Per layer the keys ``x`` `[n, f]` and ``dL/dy`` `[n, d]` (float32) of the pending positions, for L the
    summed next-token cross-entropy of those positions under ``labels`` `[n]`."""
    with autograd_on():
        logits = graph.logits if graph.rows is None else graph.logits[graph.rows]
        loss = F.cross_entropy(logits.float(), normal(labels), reduction="sum")
        grads = torch.autograd.grad(loss, [graph.probes[layer] for layer in layers])
    keys, out = {}, {}
    for layer, g in zip(layers, grads):
        g = g.reshape(-1, g.shape[-1])
        X = graph.x[layer]
        if graph.rows is not None:
            g, X = g[graph.rows], X[graph.rows]
        keys[layer], out[layer] = X.detach(), g.detach().float()
    return keys, out
