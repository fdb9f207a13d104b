"""An episode: one token stream scored under every rule, with its answer spans, turns and scored spans.

Positions are indices into `tokens`. The NLL "at position p" is the loss of tokens[p] given tokens[:p]
(from the logits at p - 1), so a span [a, b) of scored positions never reads a token at or after b.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Query:
    """A scored answer: the gold tokens at [start, end) and, for multiple choice, every candidate's tokens.

    `candidates` holds the gold continuation at index `gold`; it is empty for tasks scored by NLL only.
    `distance` is the token distance from the fact the query asks about, where the task defines one.
    """

    start: int
    end: int
    candidates: tuple[tuple[int, ...], ...] = ()
    gold: int = 0
    distance: int | None = None


@dataclass(frozen=True)
class Episode:
    """One stream, identical for every rule. `breaks` are positions where a new turn starts: the attention
    cache is dropped just before that token is fed, and the turn's first token (BOS) is not scored."""

    task: str
    variant: str
    shots: int | None
    ctx_len: int | None
    index: int
    seed: int
    tokens: tuple[int, ...]
    queries: tuple[Query, ...] = ()
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    breaks: tuple[int, ...] = ()

    @property
    def cell(self) -> tuple[str, str, int | None, int | None]:
        return (self.task, self.variant, self.shots, self.ctx_len)

    def turn_lengths(self) -> list[int]:
        edges = [0, *self.breaks, len(self.tokens)]
        return [b - a for a, b in zip(edges, edges[1:])]

    def fingerprint(self) -> str:
        """A stable digest of what is scored (tokens, answers, candidates, turns)."""
        body = {
            "tokens": list(self.tokens),
            "queries": [[q.start, q.end, [list(c) for c in q.candidates], q.gold] for q in self.queries],
            "spans": sorted((k, list(v)) for k, v in self.spans.items()),
            "breaks": list(self.breaks),
        }
        return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def data_hash(episodes: Sequence[Episode]) -> str:
    """sha256 over the fingerprints of a task's episodes, in order: equal hashes mean identical data."""
    h = hashlib.sha256()
    for ep in episodes:
        h.update(ep.fingerprint().encode())
    return "sha256:" + h.hexdigest()


class TokenizationDrift(RuntimeError):
    """Appending text changed the tokens of what came before, so answer spans would be misplaced."""


class EpisodeBuilder:
    """Builds an episode from text pieces; tokens come from encoding each turn's whole text, so they
    match what a user would send. Answers are recorded as token spans and candidates are encoded in
    place (the context's text + the candidate)."""

    def __init__(self, encode: Encode, bos_id: int | None):
        self._encode = encode
        self._bos = [] if bos_id is None else [bos_id]
        self._done: list[int] = []
        self._turn_text = ""
        self._turn_ids: list[int] = []
        self._breaks: list[int] = []
        self._queries: list[Query] = []
        self._spans: dict[str, tuple[int, int]] = {}

    @property
    def length(self) -> int:
        return len(self._done) + len(self._bos) + len(self._turn_ids)

    def _extend(self, piece: str) -> tuple[int, int]:
        start = self.length
        ids = self._encode(self._turn_text + piece)
        if ids[: len(self._turn_ids)] != self._turn_ids:
            raise TokenizationDrift(f"appending {piece[:40]!r} re-tokenized earlier text; start pieces with a space")
        self._turn_text += piece
        self._turn_ids = ids
        return start, self.length

    def _tail_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._encode(self._turn_text + piece)
        if ids[: len(self._turn_ids)] != self._turn_ids:
            raise TokenizationDrift(f"candidate {piece[:40]!r} re-tokenized the context")
        return tuple(ids[len(self._turn_ids) :])

    def text(self, piece: str, span: str | None = None) -> tuple[int, int]:
        """Append context text; with `span`, record its token range as a named scored span."""
        start, end = self._extend(piece)
        if span is not None:
            self._spans[span] = (start, end)
        return start, end

    def answer(self, gold: str, candidates: Sequence[str] = (), distance: int | None = None) -> Query:
        """Append the gold answer text and record a query; `candidates` must contain `gold`."""
        cand_ids = tuple(self._tail_ids(c) for c in candidates)
        gold_index = list(candidates).index(gold) if candidates else 0
        start, end = self._extend(gold)
        if cand_ids and cand_ids[gold_index] != tuple(self.tokens()[start:end]):
            raise TokenizationDrift(f"gold {gold!r} tokenized differently in place")
        q = Query(start, end, cand_ids, gold_index, distance)
        self._queries.append(q)
        return q

    def tokens(self) -> list[int]:
        return self._done + self._bos + self._turn_ids

    def build(self, task: str, variant: str, shots: int | None, ctx_len: int | None, index: int, seed: int) -> Episode:
        return Episode(task, variant, shots, ctx_len, index, seed, tuple(self.tokens()), tuple(self._queries),
                       dict(self._spans), tuple(self._breaks))
