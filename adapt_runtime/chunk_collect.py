"""How the runtime collects each row's pending chunk and turns a finished one into a ``Chunk`` for the rule.

After each model call every row's records (the plastic layers' bindings: ``x``, ``y``, ``h``, the final norm's
scale) go into the row's pending chunk, and the positions whose next token is now known get the rule's
per-position targets, all rows in one ``rule.targets`` call. When the next token of a row's last fed position
arrives with the next call, that position's targets follow (again one call for all rows). The pending chunk keeps
the targets under the names the rule gave them, so state files hold them (``pending.target.<name>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adapt_runtime.chunk import Chunk
from adapt_runtime.chunk_grad import Call, ChunkGraph, gradients, recompute
from adapt_runtime.pending import PendingChunk
from adapt_runtime.plastic import FINAL_SCALE, Binding
from adapt_runtime.rules import Rule
from adapt_runtime.state import FastWeights


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

    x, grads = rows("x"), {}
    if rule.needs_grad:
        x, grads = gradients(graph if graph is not None else recompute(call, state), labels, layers)
    offset = state.tokens_offset
    tokens = torch.tensor([state.tokens[p - offset] for p in pending.positions], dtype=torch.long,
                          device=labels.device)
    targets = {name: pending.target(name) for name in list(pending.targets) if name != FINAL_SCALE}
    return Chunk(layers=layers, x=x, labels=labels, tokens=tokens, lr=lr, y=rows("y"), h=rows("h"),
                 targets={k: v for k, v in targets.items() if v is not None},
                 final_scale=pending.target(FINAL_SCALE), grads=grads)
