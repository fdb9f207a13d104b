"""Prompt reading in pieces: the model thread reads pending prompts a bounded number of tokens at a time.

A long prompt read in one ``rt.forward`` stalls every stream that is decoding (8 clients sending prompts cut
another stream from 443 to 28 tok/s). The scheduler instead calls ``PromptReader.read`` once per loop iteration,
between two decode steps: it feeds at most ``chunk`` prompt tokens in all, in pieces taken round-robin over the
jobs that are reading (a job's prompts in order), so decode steps keep coming while prompts are read. This is
the token budget per step of vLLM's chunked prefill (``max_num_batched_tokens``, with decode requests first);
``chunk`` 0 or None reads every pending prompt whole before the next step, as before.

The runtime gives the same logits and state whether a stream is fed in one call or in pieces; a piece cut short
by the budget also ends on a multiple of the rule's chunk, so the runtime's own per-chunk calls are the same as
for the whole prompt and the result is the same bit for bit. Between pieces a job whose client left stops
reading; a piece that raises fails its own job only. ``echo`` prompts are scored piece by piece (each piece's
first token under the previous piece's last logits), so a long prompt never holds its ``[T, V]`` logits.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from adapt_runtime.serving.engine.events import Event, PromptScored

if TYPE_CHECKING:
    from adapt_runtime.serving.engine.scheduler import Job

    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import FastWeights

log = logging.getLogger("adapt_serve")


@dataclass
class Prompt:
    """One prompt of a job: ``feed`` is what still has to enter ``state`` (empty: it already holds the prompt);
    ``tokens`` the whole prompt. ``echo`` asks for per-token prompt logprobs (then ``feed == tokens``)."""

    state: FastWeights
    feed: list[int]
    tokens: list[int]
    echo: bool = False


@dataclass
class _Reading:
    """Where a job's reading stands: prompt ``index``, ``offset`` tokens of its feed already fed."""

    job: Job
    index: int = 0
    offset: int = 0
    last: torch.Tensor | None = None  # logits after the last fed token of the current prompt
    scores: list = field(default_factory=list)
    read: list[torch.Tensor] = field(default_factory=list)  # each finished prompt's last logits


class PromptReader:
    """Reads the prompts of submitted jobs, ``chunk`` tokens per ``read`` call at most (0/None: no limit).

    ``emit(job, event)`` reports each finished prompt (``PromptScored``); ``fail(job, exc)`` a job whose read
    raised. ``read`` returns the jobs whose prompts are all read, each with its prompts' last logits.
    """

    def __init__(self, runtime: Runtime, chunk: int | None, emit: Callable[[Job, Event], None],
                 fail: Callable[[Job, BaseException], None]) -> None:
        if chunk is not None and chunk < 0:
            raise ValueError(f"prefill_chunk: must be >= 0 (0: whole prompts), got {chunk}")
        self.rt = runtime
        self.chunk = chunk or None
        self.emit = emit
        self.fail = fail
        self._queue: deque[_Reading] = deque()

    @property
    def pending(self) -> int:
        """Jobs still reading."""
        return len(self._queue)

    def jobs(self) -> set[int]:
        """The ids of the jobs still reading."""
        return {id(reading.job) for reading in self._queue}

    def add(self, job: Job) -> None:
        self._queue.append(_Reading(job))

    def read(self) -> list[tuple[Job, list[torch.Tensor]]]:
        budget = self.chunk or math.inf
        done: list[tuple[Job, list[torch.Tensor]]] = []
        batch: list[tuple[_Reading, int]] = []  # this round's pieces that read no scores: fed together below
        while self._queue and budget > 0:
            reading = self._queue.popleft()
            if reading.job.cancelled.is_set():  # the client left: none of its other pieces is read
                continue
            if any(r is reading for r, _ in batch):  # its piece of this round is not fed yet: next round
                self._queue.appendleft(reading)
                break
            try:
                used = self._piece(reading, budget, batch)
            except Exception as exc:  # noqa: BLE001 - reported to the request, which rolls back
                log.warning("reading a prompt failed: %r", exc)
                self.fail(reading.job, exc)
                continue
            if used is None:  # no aligned piece fits what is left of the budget: first in the next round
                self._queue.appendleft(reading)
                break
            budget -= used
            if reading.index == len(reading.job.prompts):
                done.append((reading.job, reading.read))
            else:
                self._queue.append(reading)  # round-robin: the other jobs read their piece first
        for reading in self._feed(batch):
            self._queue.remove(reading)
            done.append((reading.job, reading.read))
        return done

    def _piece(self, reading: _Reading, budget: float, batch: list[tuple[_Reading, int]]) -> int | None:
        """Feed the next piece of ``reading`` (at most ``budget`` tokens), or add it to ``batch`` when it reads no
        scores; the tokens it takes, or None if none fit."""
        job = reading.job
        prompt = job.prompts[reading.index]
        if not prompt.feed:
            if prompt.state.last_logits is None:
                raise RuntimeError("the session holds no logits to continue from")
            self._finish(reading, prompt.state.last_logits.float(), None)
            return 0
        remaining = len(prompt.feed) - reading.offset
        size = self._size(prompt.state.tokens_seen, remaining, budget)
        if size == 0:
            return None
        # the unembedding where it is read: every position for echo's scores, else the last one (a wrapped runtime
        # whose forward takes no ``logits`` gets them all, one piece at a time)
        last = not prompt.echo and "logits" in inspect.signature(self.rt.forward).parameters
        if last:
            batch.append((reading, size))
            return size
        piece = prompt.feed[reading.offset : reading.offset + size]
        logits = self.rt.forward(piece, prompt.state, adapt=job.adapt)[0]
        if prompt.echo:
            reading.scores.extend(_score(reading.last, logits, piece, job.params.logprobs or 0))
        self._advance(reading, size, logits[-1])
        return size

    def _feed(self, batch: list[tuple[_Reading, int]]) -> list[_Reading]:
        """Feed the batched pieces, those of one length and ``adapt`` in one ``rt.forward`` over their states (rows
        of different sessions: the runtime keeps each row's S, KV and chunk boundaries apart); a call that raises
        is retried piece by piece, so only a piece that fails alone fails its job. Returns the readings that read
        their job's last prompt."""
        groups: dict[tuple[int, bool], list[_Reading]] = {}
        for reading, size in batch:
            groups.setdefault((size, reading.job.adapt), []).append(reading)
        finished: list[_Reading] = []
        for (size, adapt), readings in groups.items():
            live = [r for r in readings if not r.job.cancelled.is_set()]
            if not live:
                continue
            try:
                logits = self._forward(live, size, adapt)
            except Exception as exc:  # noqa: BLE001 - isolate: one by one, a piece that fails alone fails its job
                if len(live) == 1:
                    log.warning("reading a prompt failed: %r", exc)
                    self.fail(live[0].job, exc)
                    continue
                log.warning("a batched read of %d pieces failed (%r); reading them one by one", len(live), exc)
                for reading in live:
                    finished += self._feed([(reading, size)])
                continue
            for row, reading in enumerate(live):
                self._advance(reading, size, logits[row, -1])
                if reading.index == len(reading.job.prompts):
                    finished.append(reading)
        return finished

    def _forward(self, readings: list[_Reading], size: int, adapt: bool) -> torch.Tensor:
        pieces = [r.job.prompts[r.index].feed[r.offset : r.offset + size] for r in readings]
        states = [r.job.prompts[r.index].state for r in readings]
        ids = torch.tensor(pieces, dtype=torch.long)
        return self.rt.forward(ids, states if len(states) > 1 else states[0], adapt=adapt, logits="last")

    def _advance(self, reading: _Reading, size: int, last: torch.Tensor) -> None:
        """``reading`` fed ``size`` more tokens, the last of them giving ``last``."""
        prompt = reading.job.prompts[reading.index]
        reading.last = last.float()
        reading.offset += size
        if reading.offset == len(prompt.feed):
            self._finish(reading, reading.last, reading.scores if prompt.echo else None)

    def _size(self, seen: int, remaining: int, budget: float) -> int:
        """A piece of at most ``budget`` tokens; cut short, it ends on a multiple of the rule's chunk when one
        fits (0: none fits in a budget already partly spent this round)."""
        if remaining <= budget:
            return remaining
        cut = int(budget)
        chunk = getattr(getattr(self.rt, "config", None), "chunk_size", 1) or 1
        aligned = (seen + cut) // chunk * chunk - seen
        if aligned > 0:
            return aligned
        return cut if budget == self.chunk else 0

    def _finish(self, reading: _Reading, last: torch.Tensor, scores: list | None) -> None:
        prompt = reading.job.prompts[reading.index]
        self.emit(reading.job, PromptScored(reading.index, len(prompt.tokens), scores))
        reading.read.append(last)
        reading.index += 1
        reading.offset, reading.last, reading.scores = 0, None, []


def _score(before: torch.Tensor | None, logits: torch.Tensor, tokens: list[int], k: int) -> list:
    """Per token of a piece: (its logprob, top-k) under the logits before it; None for a prompt's first token
    (``before`` None: the piece starts the prompt)."""
    if before is None:
        rows, targets, head = logits[:-1], tokens[1:], [None]
    else:
        rows, targets, head = torch.cat([before[None], logits[:-1]]), tokens, []
    lp = torch.log_softmax(rows.float(), dim=-1)  # [len(targets), V]
    target = torch.tensor(targets, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, target[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k > 0 and chosen:
        values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return head + [(c, t) for c, t in zip(chosen, tops)]
