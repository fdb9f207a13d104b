"""One-pass prefill for layer-local rules: a span of known tokens runs through the model once.

A rule is layer-local (``Rule.layer_local``) when the write of a plastic layer reads only that layer's own records
(``x``, ``y``, ``h``), the chunk's tokens and labels, and targets that need no logits (``Rule.label_targets``). Then
the chunks a span completes need not wait for the top of the model: inside each plastic layer the span is cut at
the chunk boundaries of each row's stream, each piece is applied with ``S_k`` and the chunk it completes is written,
``S_{k+1} = decay * S_k + clip(U_k)`` (the chunk-parallel form of LaCT and flash-linear-attention: ``S_k`` is the
decay-weighted prefix sum of the earlier chunks' updates on top of the starting S). The writes are those of the
segment path, one chunk at a time, layer by layer, so logits and final state agree with it within float tolerance.

Semantics that only hold across layers are kept by falling back: a write refused in any layer (a non-finite or
overflowing write refuses every layer's write of that chunk in the segment path), a write with step options, or
any layer disagreeing makes the pass ``failed``; the runtime then puts the KV back and runs the segment path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapt_runtime import kernels
from adapt_runtime.chunk import Chunk
from adapt_runtime.chunk_collect import labels_of
from adapt_runtime.rules import Rule, Write
from adapt_runtime.state import FastWeights
from adapt_runtime.writes import OVERFLOW_GUARD, write_bound


def segments(start: int, total: int, chunk_size: int) -> list[tuple[int, int, bool]]:
    """A row's span of ``total`` tokens from stream position ``start``, cut at chunk boundaries: ``(a, e, fires)``
    call-relative bounds, ``fires`` when the piece completes a chunk whose next token is in the span (its write
    fires inside the span)."""
    out, p = [], 0
    while p < total:
        e = min(total, ((start + p) // chunk_size + 1) * chunk_size - start)
        out.append((p, e, (start + e) % chunk_size == 0 and e < total))
        p = e
    return out


@dataclass
class Row:
    """One row of a one-pass call: its state, segments and what its pending chunk holds at the start."""

    state: FastWeights
    ids: Tensor  # [T]
    segs: list[tuple[int, int, bool]]
    pending_tokens: Tensor | None = None  # [m] of the pending positions when the first piece completes their chunk
    pending_labels: Tensor | None = None

    @property
    def trail(self) -> int:
        """Call-relative start of the positions left pending after the span (after the last fired chunk)."""
        return max((e for _, e, fires in self.segs if fires), default=0)

    @property
    def consumes_pending(self) -> bool:
        return self.segs[0][2] and len(self.state.pending) > 0


@dataclass
class OnePass:
    """The plan of one one-pass call, handed to every plastic layer through its ``Binding``; the layers leave their
    rows' final S and write counts here."""

    rule: Rule
    rows: list[Row]
    lr: float
    decay: float
    clip: float | None
    norm_bound: float | None
    w0_norm: dict[int, float]
    failed: bool = False
    S: dict[int, list[Tensor | None]] = field(default_factory=dict)  # per layer, each row's final S (None: none)
    fired: dict[int, list[int]] = field(default_factory=dict)  # per layer, each row's applied chunk writes

    @staticmethod
    def plan(rule: Rule, states: list[FastWeights], ids: Tensor, chunk_size: int, **options: object) -> OnePass:
        rows = []
        for b, s in enumerate(states):
            row = Row(s, ids[b], segments(s.tokens_seen, ids.shape[1], chunk_size))
            if row.consumes_pending:
                offset = s.tokens_offset
                row.pending_tokens = torch.tensor([s.tokens[p - offset] for p in s.pending.positions],
                                                  dtype=torch.long, device=ids.device)
                row.pending_labels = labels_of(s, int(ids[b, 0]))
            rows.append(row)
        return OnePass(rule, rows, **options)  # type: ignore[arg-type]

    @property
    def fires(self) -> bool:
        """Whether any row's span completes a chunk inside it (else the segment path is one call already)."""
        return any(fires for row in self.rows for _, _, fires in row.segs)

    # ------------------------------------------------------------------ inside a plastic layer
    def layer(self, index: int, x: Tensor, y: Tensor, records: dict[str, Tensor]) -> Tensor:
        """Layer ``index``'s fast-weight part over the span: ``y`` `[B, T, d]` (``W0 x`` + bias) gets each piece's
        ``x S_k^T``, and each completed chunk is written; returns ``y``."""
        self.S[index], self.fired[index] = [], []
        for b, row in enumerate(self.rows):
            S, fired = self._row(index, row, x[b], y[b], {k: v[b] for k, v in records.items()})
            self.S[index].append(S)
            self.fired[index].append(fired)
        return y

    def _row(self, i: int, row: Row, x: Tensor, y: Tensor, records: dict[str, Tensor]) -> tuple[Tensor | None, int]:
        s, rule = row.state, self.rule
        start = s.S[i]
        S = None if start is None else start.clone()[None]
        slot = torch.zeros(1, dtype=torch.long, device=x.device)
        reads_y = "y" in rule.capture
        firing = [(a, e) for a, e, fires in row.segs if fires]
        writes: list[list[Write]] = []
        if not reads_y and firing and not self.failed:  # targets do not read S: every chunk's writes at once
            writes = rule.write_layer([self._chunk(i, row, a, e, x, y, records) for a, e in firing])
        fired, k = 0, 0
        for a, e, fires in row.segs:
            if S is not None:
                kernels.apply(y[a:e], x[a:e], S, slot, torch.tensor([0, e - a], device=x.device))
            if not fires or self.failed:
                continue
            chunk_writes = (rule.write_layer([self._chunk(i, row, a, e, x, y, records)])[0] if reads_y
                            else writes[k])
            k += 1
            if not chunk_writes:
                continue
            if S is None:
                d, f = s.spec.shapes[s.spec.layers.index(i)]
                S = torch.zeros(1, d, f, dtype=s.spec.dtype, device=x.device)
            if not self._write(i, S, slot, chunk_writes):
                self.failed = True
                continue
            fired += 1
        return (None if S is None else S[0]), fired

    def _chunk(self, i: int, row: Row, a: int, e: int, x: Tensor, y: Tensor, records: dict[str, Tensor]) -> Chunk:
        """The one-layer ``Chunk`` of the chunk that the piece ``[a, e)`` completes (with the pending positions the
        state held for it when it is the first piece)."""
        s, rule = row.state, self.rule
        tokens, labels = row.ids[a:e], row.ids[a + 1 : e + 1]
        first = a == 0 and row.consumes_pending
        new = {"x": x[a:e], "y": y[a:e]}
        if "h" in records:
            new["h"] = records["h"][a:e]
        if first:
            for name in rule.capture:
                new[name] = torch.cat([s.pending.rows(name, i), new[name]])
            tokens = torch.cat([row.pending_tokens, tokens])
            labels = torch.cat([row.pending_labels, labels])
        targets = {}
        if rule.stashes_targets:
            local = rule.label_targets(row.ids[a + 1 : e + 1])
            for name, value in local.items():
                stashed = s.pending.target(name) if first else None
                targets[name] = value if stashed is None else torch.cat([stashed.to(value.dtype), value])
        per_layer = {name: {i: new[name]} for name in ("y", "h") if name in rule.capture}
        return Chunk(layers=(i,), x={i: new["x"]}, labels=labels, tokens=tokens, lr=self.lr, targets=targets,
                     **per_layer)

    def _write(self, i: int, S: Tensor, slot: Tensor, writes: list[Write]) -> bool:
        """One chunk's write of layer ``i`` into ``S`` `[1, d, f]` as ``apply_writes`` and the norm bound make it;
        False (nothing written) where the segment path would not write it the same way."""
        if len(writes) != 1 or writes[0].layer != i:
            return False
        w = writes[0]
        steps = getattr(w, "steps", None)
        if steps is not None and not getattr(steps, "plain", False):
            return False  # step options read the state across layers' semantics: the segment path takes them
        if not bool(write_bound(w).to(S.device) <= OVERFLOW_GUARD):  # refused in every layer there (NaN too)
            return False
        decay = self.decay if getattr(w, "decay", None) is None else w.decay
        max_norm = None if self.clip is None else torch.tensor([self.clip * self.w0_norm[i]], device=S.device)
        kernels.write(S, slot, w.V[None], w.X[None], w.beta[None], decay, max_norm)
        if self.norm_bound is not None:
            norm = float(torch.linalg.vector_norm(S[0], dtype=torch.float32))
            limit = self.norm_bound * self.w0_norm[i]
            if norm > limit:
                S[0].mul_(limit / norm)
        return True
