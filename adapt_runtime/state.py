"""``FastWeights``: one session's plastic state. Data only: S per layer, the pending chunk, KV cache, counters."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adapt_runtime.chunk import PendingChunk

if TYPE_CHECKING:
    from adapt_runtime.checkpoint import Checkpoint

_VERSIONS = itertools.count(1)
# Resident bytes of one stream position held in a Python list (``tokens``, ``pending.positions``): the list's
# 8-byte slot and the int object it points to (28 bytes on 64-bit CPython; ids below 257 are shared, counted anyway).
POSITION_BYTES = 36


def retained_start(tokens_seen: int, kv_len: int, pending: PendingChunk, chunk_size: int) -> int:
    """The first stream position a state still needs: the first its KV cache covers, or the start of its pending
    chunk if that is earlier."""
    keep = tokens_seen - kv_len
    if len(pending):
        keep = min(keep, pending.chunk * chunk_size, pending.positions[0])
    return keep


@dataclass(frozen=True)
class StateSpec:
    """What a state must match to be used with a runtime (checked when a state file is loaded)."""

    fingerprint: str
    rule: str
    config_json: str
    layers: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]  # (d, f) per plastic layer
    chunk_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def state_rank(self) -> int | None:
        """The rank r of a runtime that holds S as factors ``B [d, k] A [k, f]`` (``k <= r``); None: dense S."""
        return json.loads(self.config_json).get("state_rank")


class FastWeights:
    """The fast weights of one session (one batch row), with everything needed to continue its stream.

    Attributes:
        S: per plastic layer, the `[d, f]` delta, or None while it is zero (nothing written yet).
        pending: the rows captured for the current incomplete chunk.
        kv: per attention layer ``(keys, values)`` `[1, H, L, D]`, or None when empty.
        tokens: the retained tail of the session's stream: the token ids from absolute position
            ``tokens_offset`` on. A state keeps what it can still read: the tokens its KV cache covers (a request
            that extends them computes only its suffix) and those of its pending chunk (the write's labels and the
            gradient rule's recompute); older ones are dropped by ``compact`` so a stream's memory stays bounded.
        tokens_offset: absolute stream position of ``tokens[0]`` (chunks stay absolute: ``tokens_seen`` counts
            every token fed).
        last_logits: `[V]` logits after the last fed token, or None.
        writes, refused_writes: counters of fired writes and of writes refused for non-finite values.
        version: bumped on every change of S (lets a runtime cache ``W0 + S``).
    """

    def __init__(self, spec: StateSpec) -> None:
        self.spec = spec
        self.S: dict[int, Tensor | None] = {layer: None for layer in spec.layers}
        self.pending = PendingChunk()
        self.kv: list[tuple[Tensor, Tensor]] | None = None
        self.tokens: list[int] = []
        self.tokens_offset = 0
        self.last_logits: Tensor | None = None
        self.writes = 0
        self.refused_writes = 0
        self.version = 0
        self.kv_tokens = 0
        self.factors: dict[int, tuple[Tensor, Tensor]] = {}  # state_rank runtimes: S = B @ A per layer
        self.extra: dict[str, dict[int, Tensor]] = {}  # the rule's step state besides S (rules.steps: momentum, slow)
        self.checkpoint: Checkpoint | None = None  # an open turn's committed point (``adapt_runtime.checkpoint``)

    def before_change(self, tensor: Tensor) -> None:
        """``tensor`` (S of a layer, a rule's extra tensor, or a slot row that one of them views) is about to be
        changed in place: an open checkpoint that holds it keeps a copy first (copy-on-first-write)."""
        if self.checkpoint is not None:
            self.checkpoint.protect(tensor)

    def bump(self) -> None:
        """Mark S as changed (a process-wide counter, so a (state, version) pair is never reused)."""
        self.version = next(_VERSIONS)

    @property
    def tokens_seen(self) -> int:
        """Every token fed so far (the absolute length of the stream, retained or not)."""
        return self.tokens_offset + len(self.tokens)

    def token_span(self, start: int, stop: int) -> list[int]:
        """The ids at absolute stream positions ``[start, stop)``; raises if part of it is no longer retained."""
        if start < self.tokens_offset or stop > self.tokens_seen or start > stop:
            raise IndexError(f"stream positions [{start}, {stop}) are outside the retained tokens "
                             f"[{self.tokens_offset}, {self.tokens_seen})")
        return self.tokens[start - self.tokens_offset : stop - self.tokens_offset]

    def compact(self) -> None:
        """Drop the stream's tokens that nothing reads any more: keep those the KV cache covers and those from the
        start of the pending chunk on (its labels, and the gradient rule's recompute of the chunk)."""
        keep = retained_start(self.tokens_seen, self.kv_len, self.pending, self.spec.chunk_size)
        drop = keep - self.tokens_offset
        if drop > 0:
            del self.tokens[:drop]
            self.tokens_offset = keep

    @property
    def kv_len(self) -> int:
        return self.kv_tokens if self.kv else 0

    @property
    def is_zero(self) -> bool:
        return all(s is None for s in self.S.values()) and not self.factors

    @property
    def nbytes(self) -> int:
        """Bytes held: S (or its factors), the pending chunk, the KV cache, the last logits and the retained
        stream (``POSITION_BYTES`` per token and per pending position)."""
        total = sum(s.numel() * s.element_size() for s in self.S.values() if s is not None)
        total += sum(t.numel() * t.element_size() for pair in self.factors.values() for t in pair)
        total += sum(t.numel() * t.element_size() for part in self.extra.values() for t in part.values())
        if self.kv:
            total += sum(t.numel() * t.element_size() for pair in self.kv for t in pair)
        if self.last_logits is not None:
            total += self.last_logits.numel() * self.last_logits.element_size()
        total += POSITION_BYTES * (len(self.tokens) + len(self.pending.positions))
        return total + self.pending.nbytes

    def delta(self, layer: int, create: bool = False) -> Tensor | None:
        """The layer's S; with ``create``, allocated as zeros on first use."""
        s = self.S[layer]
        if s is None and create:
            d, f = self.spec.shapes[self.spec.layers.index(layer)]
            s = torch.zeros(d, f, dtype=self.spec.dtype, device=self.spec.device)
            self.S[layer] = s
        return s

    def delta_norms(self) -> dict[int, float]:
        """Frobenius norm of S per plastic layer (of ``B A`` for factors, by the `[k, k]` Gram form
        ``||B A||_F^2 = tr((B^T B)(A A^T))``, without forming the product)."""
        norms = {k: 0.0 if s is None else float(torch.linalg.vector_norm(s.float())) for k, s in self.S.items()}
        for k, (b, a) in self.factors.items():
            norms[k] = float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())
        return norms

    def drop_kv(self) -> None:
        """Forget the attention cache. S, the pending chunk and the stream's length stay; positions restart at 0.
        The tokens only the cache needed are dropped (``compact``)."""
        self.kv = None
        self.kv_tokens = 0
        self.compact()

    def reset(self) -> None:
        """Back to a fresh state: S = 0, no stream, no KV, counters at 0."""
        self.S = {layer: None for layer in self.spec.layers}
        self.factors = {}
        self.extra = {}
        self.pending.clear()
        self.kv = None
        self.tokens = []
        self.tokens_offset = 0
        self.last_logits = None
        self.writes = self.refused_writes = 0
        self.kv_tokens = 0
        self.bump()

    def clone(self) -> FastWeights:
        """A deep copy (a fork of the session)."""
        copy = FastWeights(self.spec)
        copy.S = {k: None if s is None else s.clone() for k, s in self.S.items()}
        copy.factors = {k: (b.clone(), a.clone()) for k, (b, a) in self.factors.items()}
        copy.extra = {name: {k: t.clone() for k, t in part.items()} for name, part in self.extra.items()}
        copy.pending = self.pending.clone()
        copy.kv = None if self.kv is None else [(k.clone(), v.clone()) for k, v in self.kv]
        copy.tokens, copy.tokens_offset = list(self.tokens), self.tokens_offset
        copy.last_logits = None if self.last_logits is None else self.last_logits.clone()
        copy.writes, copy.refused_writes = self.writes, self.refused_writes
        copy.kv_tokens = self.kv_tokens
        copy.bump()
        return copy

    def save(self, path: str | Path, include_kv: bool = True) -> None:
        """Write the state atomically as a safetensors file with metadata (see ``adapt_runtime.state_file``)."""
        from adapt_runtime.state_file import save_state

        save_state(self, path, include_kv=include_kv)

    def to_bytes(self, include_kv: bool = True, extra_metadata: dict[str, str] | None = None) -> bytes:
        """The state file's bytes; ``extra_metadata`` is stored in its header (see ``state_file.state_to_bytes``)."""
        from adapt_runtime.state_file import state_to_bytes

        return state_to_bytes(self, include_kv=include_kv, extra_metadata=extra_metadata)

    def __repr__(self) -> str:
        return (
            f"FastWeights(rule={self.spec.rule!r}, layers={list(self.spec.layers)}, tokens={self.tokens_seen}, "
            f"kv={self.kv_len}, writes={self.writes}, refused={self.refused_writes}, bytes={self.nbytes})"
        )
