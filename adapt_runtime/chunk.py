"""A chunk's life as data: what a state captures of its open chunk (``PendingChunk``), how the runtime collects it,
and the finished ``Chunk`` a rule's ``write`` is a function of.

Collection: after each model call every row's records (the plastic layers' bindings: ``x``, ``y``, ``h``, the
final norm's scale) go into the row's pending chunk (``record``), and the positions whose next token is now known
get the rule's per-position targets, all rows in one ``rule.targets`` call. When the next token of a row's last fed
position arrives with the next call, that position's targets follow (``label_last``, again one call for all rows).
The pending chunk keeps the targets under the names the rule gave them, so state files hold them
(``pending.target.<name>``). When the chunk's write fires, ``finished`` turns the pending chunk into the ``Chunk``,
with the gradient when the rule asks for it (``adapt_runtime.chunk_grad``); the write itself is
``adapt_runtime.write``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adapt_runtime.chunk_grad import Call, ChunkGraph, gradients, recompute

if TYPE_CHECKING:
    from adapt_runtime.plastic import Binding
    from adapt_runtime.rules import Rule
    from adapt_runtime.state import FastWeights

RETRIEVED = "sx"  # record name of ``S x``, the fast weights' own part of a plastic layer's output
RETRIEVAL_KEY = "retrieved"  # its state-file key: ``pending.retrieved.<layer>``
FINAL_SCALE = "inv_rms"  # record name of the final norm's scale (also its name in a state's pending targets)


# ------------------------------------------------------------------ the chunk as data
@dataclass
class PendingChunk:
    """Rows captured for the chunk being read; cleared when the chunk's write fires.

    Attributes:
        chunk: index of the chunk these rows belong to (-1 when empty).
        positions: absolute stream positions of the captured rows.
        layers: per plastic layer and capture name (``x``, ``y``, ``h``), the rows as a list of `[n, *]` pieces.
        targets: per-position shared targets ``v`` `[n, d]` and rates ``beta`` `[n]` computed so far (rules
            whose target needs only the next token fill these as labels arrive).
        retrieved: per plastic layer ``S x_t`` `[n, d]` as the positions were read (the runtime records it for the
            delta form where the forward formed it apart): it saves the write a product with S. State files hold
            it (``pending.retrieved.<layer>``) where every pending position has it; a chunk that lacks it for any
            position forms the product anew (an older file, a chunk read partly by single-token calls).
    """

    chunk: int = -1
    positions: list[int] = field(default_factory=list)
    layers: dict[str, dict[int, list[Tensor]]] = field(default_factory=dict)
    targets: dict[str, list[Tensor]] = field(default_factory=dict)
    retrieved: dict[int, list[Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.positions)

    def clear(self) -> None:
        self.chunk = -1
        self.positions.clear()
        self.layers.clear()
        self.targets.clear()
        self.retrieved.clear()

    def add_rows(self, name: str, layer: int, rows: Tensor) -> None:
        self.layers.setdefault(name, {}).setdefault(layer, []).append(rows)

    def add_target(self, name: str, rows: Tensor) -> None:
        self.targets.setdefault(name, []).append(rows)

    def rows(self, name: str, layer: int) -> Tensor:
        pieces = self.layers[name][layer]
        if len(pieces) > 1:
            pieces[:] = [torch.cat(pieces)]
        return pieces[0]

    def target(self, name: str) -> Tensor | None:
        pieces = self.targets.get(name)
        if not pieces:
            return None
        if len(pieces) > 1:
            pieces[:] = [torch.cat(pieces)]
        return pieces[0]

    def retrieval(self, layer: int) -> Tensor | None:
        """``S x`` `[n, d]` of every pending position of ``layer``, or None when any position's was not recorded."""
        pieces = self.retrieved.get(layer)
        if not pieces or sum(p.shape[0] for p in pieces) != len(self.positions):
            return None
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def target_len(self, name: str) -> int:
        return sum(p.shape[0] for p in self.targets.get(name, []))

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor map for state files."""
        out: dict[str, Tensor] = {}
        for name, per_layer in self.layers.items():
            for layer in per_layer:
                out[f"pending.{name}.{layer}"] = self.rows(name, layer)
        for name in self.targets:
            value = self.target(name)
            if value is not None:
                out[f"pending.target.{name}"] = value
        for layer in list(self.retrieved):
            value = self.retrieval(layer)
            if value is not None:
                self.retrieved[layer] = [value]
                out[f"pending.{RETRIEVAL_KEY}.{layer}"] = value
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key, value in tensors.items():
            parts = key.split(".")
            if parts[:2] == ["pending", "target"]:
                self.targets[parts[2]] = [value]
            elif parts[:2] == ["pending", RETRIEVAL_KEY]:
                self.retrieved[int(parts[2])] = [value]
            elif parts[0] == "pending":
                self.layers.setdefault(parts[1], {})[int(parts[2])] = [value]

    def clone(self) -> PendingChunk:
        copy = PendingChunk(chunk=self.chunk, positions=list(self.positions))
        for name, per_layer in self.layers.items():
            for layer in per_layer:
                copy.add_rows(name, layer, self.rows(name, layer).clone())
        for name in self.targets:
            value = self.target(name)
            if value is not None:
                copy.add_target(name, value.clone())
        for layer in self.retrieved:
            value = self.retrieval(layer)
            if value is not None:
                copy.retrieved[layer] = [value.clone()]
        return copy

    @property
    def nbytes(self) -> int:
        total = sum(p.numel() * p.element_size() for d in self.layers.values() for ps in d.values() for p in ps)
        total += sum(p.numel() * p.element_size() for ps in self.retrieved.values() for p in ps)
        return total + sum(p.numel() * p.element_size() for ps in self.targets.values() for p in ps)


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
        retrieved: per layer ``S x_t`` `[n, d]` under the S the chunk was read with (``PendingChunk.retrieved``),
            for layers where every position's was recorded; the write's delta form takes it for ``X S^T``.
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
    retrieved: dict[int, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ------------------------------------------------------------------ collection
def labelled(pending: PendingChunk) -> int:
    """How many of the pending positions (a prefix) have the rule's targets."""
    return max((pending.target_len(name) for name in pending.targets if name != FINAL_SCALE), default=0)


def labels_of(state: FastWeights, next_token: int) -> Tensor:
    """Next-token labels `[n]` of the pending positions (the stream, then ``next_token`` past its end)."""
    stream, offset, seen = state.tokens, state.tokens_offset, state.tokens_seen
    labels = [stream[p + 1 - offset] if p + 1 < seen else next_token for p in state.pending.positions]
    return torch.tensor(labels, dtype=torch.long, device=state.spec.device)


def _stash(states: Sequence[FastWeights], targets: dict[str, Tensor], per_row: int) -> None:
    for b, s in enumerate(states):
        for name, t in targets.items():
            s.pending.add_target(name, t[b * per_row : (b + 1) * per_row])


def record(rule: Rule, states: Sequence[FastWeights], starts: Sequence[int], bindings: dict[int, Binding],
           logits: Tensor, nxt: Tensor, chunk_size: int, n: int | None = None) -> None:
    """One call's segment of each row into its pending chunk. ``starts``: each row's stream position of the
    segment's first token; ``n`` the segment's length (default: the logits'); ``logits`` `[B, n, V]`, or fewer
    positions when the rule stashes no targets (a caller that reads only the last); ``nxt`` `[B, k]` the known next
    tokens of the first ``k`` positions (``k`` is ``n`` or ``n - 1``: the last position's label comes with the next
    call)."""
    rows, n = logits.shape[0], logits.shape[1] if n is None else n
    last = bindings[max(bindings)]
    for b, s in enumerate(states):
        pending = s.pending
        if not len(pending):
            pending.chunk = starts[b] // chunk_size
        pending.positions.extend(range(starts[b], starts[b] + n))
        for i, binding in bindings.items():
            for name in rule.capture:
                pending.add_rows(name, i, binding.records[name][b])
            if RETRIEVED in binding.records:
                pending.retrieved.setdefault(i, []).append(binding.records[RETRIEVED][b])
        if FINAL_SCALE in last.records:
            pending.add_target(FINAL_SCALE, last.records[FINAL_SCALE].reshape(rows, -1)[b])
    k = nxt.shape[1]
    if k and rule.stashes_targets:
        labels = nxt.reshape(-1)
        targets = (rule.targets(logits[:, :k].reshape(rows * k, -1), labels) if rule.targets_read_logits
                   else rule.label_targets(labels))
        _stash(states, targets, k)


def label_last(rule: Rule, states: Sequence[FastWeights], next_tokens: Sequence[int]) -> None:
    """``next_tokens`` (one per row) are being fed: each row's last fed position, still without its targets, gets
    them now from the row's last logits, all rows in one ``rule.targets`` call."""
    if not rule.stashes_targets:
        return
    reads = rule.targets_read_logits
    rows = [(s, t) for s, t in zip(states, next_tokens)
            if len(s.pending) - labelled(s.pending) == 1
            and s.pending.positions[-1] == s.tokens_seen - 1 and (s.last_logits is not None or not reads)]
    if not rows:
        return
    labels = torch.tensor([t for _, t in rows], device=rows[0][0].spec.device)
    if reads:
        targets = rule.targets(torch.stack([s.last_logits for s, _ in rows]), labels)
    else:
        targets = rule.label_targets(labels)
    _stash([s for s, _ in rows], targets, 1)


def finished(rule: Rule, state: FastWeights, next_token: int, lr: float, graph: ChunkGraph | None,
             call: Call) -> Chunk:
    """The ``Chunk`` of ``state``'s finished pending chunk (``next_token`` labels its last position). With
    ``rule.needs_grad`` the gradient is taken on ``graph`` (the chunk's own forward), or on the chunk recomputed
    through ``call`` when there is none."""
    pending, layers = state.pending, tuple(state.spec.layers)
    labels = labels_of(state, next_token)

    def rows(name: str) -> dict[int, Tensor]:
        return {i: pending.rows(name, i) for i in layers} if name in pending.layers else {}

    x = rows("x")
    grads: dict[int, Tensor] = {}
    if rule.needs_grad:
        x, grads = gradients(graph if graph is not None else recompute(call, state), labels, layers)
    offset = state.tokens_offset
    tokens = torch.tensor([state.tokens[p - offset] for p in pending.positions], dtype=torch.long,
                          device=labels.device)
    targets = {name: pending.target(name) for name in list(pending.targets) if name != FINAL_SCALE}
    retrieved = {i: r for i in layers if (r := pending.retrieval(i)) is not None}
    return Chunk(layers=layers, x=x, labels=labels, tokens=tokens, lr=lr, y=rows("y"), h=rows("h"),
                 targets={k: v for k, v in targets.items() if v is not None},
                 final_scale=pending.target(FINAL_SCALE), grads=grads, retrieved=retrieved)
