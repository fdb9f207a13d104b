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
from typing import Protocol

import torch
from torch import Tensor, nn

from adapt_runtime import kernels
from adapt_runtime.chunk import Chunk, labels_of
from adapt_runtime.rules import Rule, Write
from adapt_runtime.state import FastWeights
from adapt_runtime.write import OVERFLOW_GUARD, write_bound


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


class Down(Protocol):
    """What a one-pass layer reads of its plastic down projection (``adapt_runtime.plastic.PlasticDown``)."""

    base: nn.Module
    index: int

    @property
    def weight0(self) -> Tensor: ...

    @property
    def bias(self) -> Tensor | None: ...


def static_weight(down: Down) -> Tensor | None:
    """``W0`` `[d, f]` when ``down.base(x)`` is exactly ``x W0^T + bias`` with a plain float weight (an
    ``nn.Linear`` or GPT-2's ``Conv1D`` without hooks, autograd off), so that it can be folded into the scan's
    products; None otherwise (quantised or hooked layers keep their own forward)."""
    base = down.base
    if type(base) is not nn.Linear and type(base).__name__ != "Conv1D":
        return None
    if base._forward_hooks or base._forward_pre_hooks or torch.is_grad_enabled():
        return None
    weight = down.weight0
    return weight if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else None


def keys_of(writes: list[Write], x: Tensor, firing: list[tuple[int, int]]) -> Tensor:
    """The chunks' keys packed `[M, f]`: a view of ``x`` when every write's keys are the rows of its piece (the
    usual case), else their concatenation (a first chunk with pending keys, or a rule whose keys differ)."""
    views = all(w.X.shape == x[a:e].shape and w.X.stride() == x[a:e].stride() and w.X.data_ptr() == x[a:e].data_ptr()
                for w, (a, e) in zip(writes, firing))
    if views and firing[0][0] == 0 and all(p[1] == q[0] for p, q in zip(firing, firing[1:])):
        return x[: firing[-1][1]]
    return torch.cat([w.X for w in writes])


def fits_float32(V: Tensor, X: Tensor, beta: Tensor) -> Tensor:
    """Whether ``write_bound`` of every packed chunk is surely below ``OVERFLOW_GUARD``: the same bound (largest of
    ``max a``, ``max b``, ``sum a b`` with ``a_t = |beta_t| ||v_t||``, ``b_t = ||x_t||``) taken in float32, less
    than ``OVERFLOW_GUARD / 1000`` (float32 sums are off by far less than that factor; an overflow is inf, and NaN
    compares false)."""
    if not V.numel():
        return torch.ones((), dtype=torch.bool)
    b = torch.linalg.vector_norm(X.float(), dim=-1)
    a = beta.float().abs() * torch.linalg.vector_norm(V.float(), dim=-1)
    top = torch.stack([a.max(), b.max(), (a * b).sum()])  # the sum over all chunks bounds each chunk's
    return (top <= OVERFLOW_GUARD / 1000).all()


@dataclass
class Scan:
    """A row's chunk writes packed for ``kernels.chunk_scan``."""

    V: Tensor  # [M, d]
    X: Tensor  # [M, f]
    beta: Tensor  # [M]
    write_offsets: Tensor  # [J + 1]
    decay: float


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
    def layer(self, index: int, x: Tensor, down: Down, records: dict[str, Tensor]) -> Tensor:
        """Layer ``index``'s down projection over the span: for each row, ``W0 x`` + bias with each piece's
        ``x S_k^T`` added, each completed chunk written; returns ``y`` `[B, T, d]`.

        Where every chunk's writes are known before the span is applied (targets that do not read ``y``) and the
        writes take no per-layer path of their own, a row is one ``kernels.chunk_scan`` with ``W0`` folded into
        each piece's product (one matmul per piece, not the static one and the piece's); otherwise the static
        product is taken first and the pieces are applied and written one by one."""
        self.S[index], self.fired[index] = [], []
        weight = static_weight(down)
        out = []
        for b, row in enumerate(self.rows):
            y, S, fired = self._row(index, row, x[b], down, weight, {k: v[b] for k, v in records.items()})
            out.append(y)
            self.S[index].append(S)
            self.fired[index].append(fired)
        return out[0][None] if len(out) == 1 else torch.stack(out)

    def _row(self, i: int, row: Row, x: Tensor, down: Down, weight: Tensor | None,
             records: dict[str, Tensor]) -> tuple[Tensor, Tensor | None, int]:
        s, rule = row.state, self.rule
        start = s.S[i]
        firing = [(a, e) for a, e, fires in row.segs if fires]
        reads_y = "y" in rule.capture
        writes: list[list[Write]] = []
        if not reads_y and firing and not self.failed:  # targets do not read S: every chunk's writes at once
            writes = rule.write_layer([self._chunk(i, row, a, e, x, None, records) for a, e in firing])
            scan = self._scan_writes(i, row, x, writes)
            if scan is not None:
                return self._scan(i, row, x, down, weight, scan)
        y = down.base(x)
        S = None if start is None else start.clone()[None]
        slot = torch.zeros(1, dtype=torch.long, device=x.device)
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
        return y, (None if S is None else S[0]), fired

    def _scan_writes(self, i: int, row: Row, x: Tensor, writes: list[list[Write]]) -> Scan | None:
        """The packed chunk writes of a row for ``kernels.chunk_scan``, or None where the piece-by-piece path must
        take them: a chunk without exactly one write of this layer, step options, per-write decays that differ,
        the norm bound (it rescales S between chunks), a state not in float32 (the piece-by-piece path rounds it
        after every chunk), or a write that could come near float32 overflow (bounded here in float32 with a wide
        margin; the piece-by-piece path then checks it exactly, in float64, and refuses it as the segment path)."""
        if self.norm_bound is not None or row.state.spec.dtype != torch.float32:
            return None
        if any(len(ws) != 1 or ws[0].layer != i for ws in writes):
            return None
        flat = [ws[0] for ws in writes]
        if any(getattr(w, "steps", None) is not None and not getattr(w.steps, "plain", False) for w in flat):
            return None
        decays = {self.decay if w.decay is None else w.decay for w in flat}
        if len(decays) != 1:
            return None
        V = torch.cat([w.V for w in flat])
        beta = torch.cat([w.beta for w in flat])
        X = keys_of(flat, x, [(a, e) for a, e, fires in row.segs if fires])
        lengths = torch.tensor([w.V.shape[0] for w in flat])
        write_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(x.device)
        if not bool(fits_float32(V, X, beta)):
            return None
        return Scan(V, X, beta, write_offsets, decays.pop())

    def _scan(self, i: int, row: Row, x: Tensor, down: Down, weight: Tensor | None,
              scan: Scan) -> tuple[Tensor, Tensor | None, int]:
        """One row's span through ``kernels.chunk_scan``: ``y`` from the bias (``W0`` folded in) or from ``W0 x``."""
        s = row.state
        d, f = s.spec.shapes[s.spec.layers.index(i)]
        start = s.S[i]
        S = torch.zeros(1, d, f, dtype=s.spec.dtype, device=x.device) if start is None else start.clone()[None]
        if weight is None:
            y = down.base(x)
        else:
            bias = down.bias
            y = (torch.zeros(x.shape[0], d, dtype=x.dtype, device=x.device) if bias is None
                 else bias.to(x.dtype).expand(x.shape[0], d).clone())
        bounds = torch.tensor([0] + [e for _, e, _ in row.segs], device=x.device)
        max_norm = None if self.clip is None else self.clip * self.w0_norm[i]
        norms = kernels.chunk_scan(y, x, S, 0, bounds, scan.V, scan.X, scan.write_offsets, scan.beta, scan.decay,
                                   max_norm, weight)
        if not bool(norms.isfinite().all()):  # refused in every layer by the segment path
            self.failed = True
        return y, S[0], norms.numel()

    def _chunk(self, i: int, row: Row, a: int, e: int, x: Tensor, y: Tensor | None,
               records: dict[str, Tensor]) -> Chunk:
        """The one-layer ``Chunk`` of the chunk that the piece ``[a, e)`` completes (with the pending positions the
        state held for it when it is the first piece)."""
        s, rule = row.state, self.rule
        tokens, labels = row.ids[a:e], row.ids[a + 1 : e + 1]
        first = a == 0 and row.consumes_pending
        new = {"x": x[a:e]}
        if y is not None:
            new["y"] = y[a:e]
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
        """One chunk's write of layer ``i`` into ``S`` `[1, d, f]` as ``write.apply`` makes it (guard, clip, bound);
        False (nothing written) where the segment path would not write it the same way."""
        if len(writes) != 1 or writes[0].layer != i:
            return False
        w = writes[0]
        steps = getattr(w, "steps", None)
        if steps is not None and not getattr(steps, "plain", False):
            return False  # step options read the state across layers' semantics: the segment path takes them
        if not bool(write_bound(w).to(S.device) <= OVERFLOW_GUARD):  # refused in every layer there (NaN too)
            return False
        decay = self.decay if w.decay is None else w.decay
        max_norm = None if self.clip is None else torch.tensor([self.clip * self.w0_norm[i]], device=S.device)
        kernels.write(S, slot, w.V[None], w.X[None], w.beta[None], decay, max_norm)
        if self.norm_bound is not None:
            norm = float(torch.linalg.vector_norm(S[0], dtype=torch.float32))
            limit = self.norm_bound * self.w0_norm[i]
            if norm > limit:
                S[0].mul_(limit / norm)
        return True
