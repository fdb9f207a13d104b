"""``Checkpoint``: the committed point of a state that a turn changes in place, restorable bit for bit.

A session's turn works on the session's own ``FastWeights`` (one slot, no clone). Opening the turn takes a
checkpoint, which copies no tensor: it keeps references to what the turn replaces rather than changes (the KV
views, which a buffer never rewrites; the last logits; the low-rank factors, which a write replaces; the pending
chunk's pieces) and small Python values (counters, the token list, the pending positions).

S and the rule's extra tensors (``FastWeights.extra``: momentum, the slow part) are written in place. Every code
path that changes one of a state's tensors in place first calls ``FastWeights.before_change(tensor)``; when the
checkpoint holds that tensor, it keeps a copy of it first, once per tensor and turn (copy-on-first-write: a turn
that writes nothing copies nothing; later writes of the turn go in place). ``restore`` puts everything back (the
rollback); ``release`` drops the checkpoint (the commit), copying nothing either way.

``copied_bytes`` counts what the checkpoint copied, so a caller (and the tests) can see what a turn cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from adapt_runtime.chunk import PendingChunk

if TYPE_CHECKING:
    from adapt_runtime.state import FastWeights


def _shallow(pending: PendingChunk) -> PendingChunk:
    """The pending chunk's structure, the tensors shared (a turn appends pieces and clears; it never edits one)."""
    return PendingChunk(chunk=pending.chunk, positions=list(pending.positions),
                        layers={name: {k: list(p) for k, p in per.items()} for name, per in pending.layers.items()},
                        targets={name: list(p) for name, p in pending.targets.items()},
                        retrieved={layer: list(p) for layer, p in pending.retrieved.items()})


class Checkpoint:
    """The point ``state`` was at when taken; ``state.checkpoint`` is this object until ``restore`` or ``release``.

    The fields that ``GET /v1/sessions/{id}`` reports (``tokens_seen``, ``kv_len``, ``writes``, ``refused_writes``,
    ``nbytes``) are the checkpoint's, so a state in a turn can be described as it was committed.
    """

    def __init__(self, state: FastWeights) -> None:
        if state.checkpoint is not None:
            raise RuntimeError("this state already has an open checkpoint (one turn at a time)")
        self.state = state
        self.S = dict(state.S)
        self.factors = dict(state.factors)
        self.extra = {name: dict(part) for name, part in state.extra.items()}
        self.pending = _shallow(state.pending)
        self.kv = None if state.kv is None else list(state.kv)
        self.kv_tokens = state.kv_tokens
        self.tokens, self.tokens_offset = list(state.tokens), state.tokens_offset
        self.last_logits = state.last_logits
        self.writes, self.refused_writes, self.version = state.writes, state.refused_writes, state.version
        self.nbytes = state.nbytes
        self.copied_bytes = 0
        self._held = {id(t): t for t in self._tensors()}  # the tensors a turn may change in place, by identity
        state.checkpoint = self

    def _tensors(self) -> list[Tensor]:
        return [t for t in self.S.values() if t is not None] + [t for p in self.extra.values() for t in p.values()]

    @property
    def tokens_seen(self) -> int:
        return self.tokens_offset + len(self.tokens)

    @property
    def kv_len(self) -> int:
        return self.kv_tokens if self.kv else 0

    def protect(self, tensor: Tensor) -> None:
        """``tensor`` is about to change in place: if this checkpoint holds it, keep a copy of it instead."""
        if self._held.pop(id(tensor), None) is None:
            return
        copy = tensor.clone()
        self.copied_bytes += copy.numel() * copy.element_size()
        for k, t in self.S.items():
            if t is tensor:
                self.S[k] = copy
        for part in self.extra.values():
            for k, t in part.items():
                if t is tensor:
                    part[k] = copy

    def restore(self) -> None:
        """Put the state back where it was taken (bit for bit) and close the checkpoint."""
        s = self.state
        s.S, s.factors = dict(self.S), dict(self.factors)
        s.extra = {name: dict(part) for name, part in self.extra.items()}
        s.pending = self.pending
        s.kv, s.kv_tokens = self.kv, self.kv_tokens
        s.tokens, s.tokens_offset = self.tokens, self.tokens_offset
        s.last_logits = self.last_logits
        s.writes, s.refused_writes = self.writes, self.refused_writes
        s.version = self.version  # S holds the values it held under this version again
        self.release()

    def release(self) -> None:
        """Keep what the turn did (the commit): the checkpoint lets go of the state and of its copies."""
        if self.state.checkpoint is self:
            self.state.checkpoint = None
        self._held.clear()
