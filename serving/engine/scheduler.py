"""The scheduler: one worker thread owns every model call; concurrent requests decode together.

Each loop iteration reads a piece of the pending prompts (at most ``prefill_chunk`` tokens in all, round-robin
over the reading jobs, see ``prompt_reader.py``; a job's rows start once its prompts are all read), then takes one
decode step for *all* active rows, so a long prompt no longer stalls the streams that are decoding. In a step
every row samples its next token from its own logits, and the rows that go on are fed in one batched
``rt.forward(ids [B, 1], [state_1 .. state_B])``. Each row carries its own ``FastWeights``, so each applies
(and writes) only its own session's S. Rows with ``adapt`` on and off are fed in two calls, since ``adapt`` is
per call.

As in ``rt.generate``, the last token of a row is never fed: it becomes the first token of the next input.
Events are collected during a step and handed over in one batch through ``post`` (the engine queues them for
the event loop, which collects them every millisecond), then reach each request through ``Job.emit``. The
request commits or discards the states after ``Done``, so the scheduler never decides what is kept. Rows that
sample with the same settings (no seed, no penalties) are sampled in one call.

Failures stay with the jobs they belong to: a row whose sampling or accounting raises fails its own job; a
batched decode call that raises is retried row by row in the same step, so only the rows that fail alone fail
their jobs; anything else that escapes a step fails that step's jobs. The model thread itself never ends on an
error (``alive`` says whether it runs, for ``/health``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from adapt_runtime.serving.config import DEFAULT_PREFILL_CHUNK
from adapt_runtime.serving.engine.detokenize import Detokenizer, TextStream
from adapt_runtime.serving.engine.events import Done, Event, Failed, Finished, Token
from adapt_runtime.serving.engine.prompt_reader import Prompt, PromptReader
from adapt_runtime.serving.engine.sampling import SamplingParams, draw, sample_token, top_logprobs

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import FastWeights

log = logging.getLogger("adapt_serve")


@dataclass
class Row:
    """One sequence being decoded (a choice of a job)."""

    job: Job
    index: int
    state: FastWeights
    text: TextStream
    logits: torch.Tensor
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)


@dataclass
class Job:
    """One request's work: read each prompt, then decode ``n`` rows per prompt."""

    prompts: list[Prompt]
    n: int
    params: SamplingParams
    adapt: bool
    stop_ids: frozenset[int]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    states: list[FastWeights] = field(default_factory=list)
    live: int = 0
    # set by the model thread once it holds the job no more (read, decoded, failed or dropped as cancelled): from
    # then on nothing but the request touches the job's states, so a turn may roll them back in place
    released: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """Owns the model thread. ``submit`` a Job; ``close`` stops the thread after the current step.
    ``prefill_chunk``: prompt tokens read between two decode steps at most (0 or None: whole prompts)."""

    def __init__(self, runtime: Runtime, detok: Detokenizer, max_len: int,
                 on_step: Callable[[int, float], None] | None = None,
                 post: Callable[[list[tuple[Job, Event]]], None] | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> None:
        self.rt = runtime
        self._reader = PromptReader(runtime, prefill_chunk, self._emit, self._fail)
        self.post = post or _deliver
        self._outbox: list[tuple[Job, Event]] = []
        self.detok = detok
        self.max_len = max_len
        self.on_step = on_step
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._rows: list[Row] = []
        self._held: list[Job] = []  # jobs taken from the inbox and not yet released
        self._submitted: list[Job] = []  # jobs submitted and not yet seen released (the event loop's side)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="adapt-serve-model", daemon=True)
        self._thread.start()

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    @property
    def alive(self) -> bool:
        """Whether the model thread is running (False once it ended, for whatever reason)."""
        return self._thread.is_alive() and not self._closed

    def submit(self, job: Job) -> None:
        if self._closed:
            raise RuntimeError("scheduler is closed")
        self._submitted = [j for j in self._submitted if not j.released.is_set()] + [job]
        self._inbox.put(job)

    def holds(self, state: FastWeights) -> bool:
        """Whether a submitted job that the model thread has not released reads or writes ``state``."""
        self._submitted = [j for j in self._submitted if not j.released.is_set()]
        return self.alive and any(p.state is state for j in self._submitted for p in j.prompts)

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._closed:
            busy = bool(self._rows or self._reader.pending)
            try:
                job = self._inbox.get(block=not busy, timeout=0 if busy else None)
            except queue.Empty:
                job = None
            while job is not None:
                self._held.append(job)
                if not job.cancelled.is_set():
                    self._reader.add(job)
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    job = None
            if self._reader.pending:
                for read_job, logits in self._reader.read():
                    self._start(read_job, logits)
                self._flush()
            if self._rows:
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - the thread lives on; this step's jobs fail
                    log.exception("decode step failed")
                    for failed in {id(row.job): row.job for row in self._rows}.values():
                        self._fail(failed, exc)
                self._flush()
            self._release()

    def _release(self) -> None:
        """Tell every held job that is neither reading nor decoding any more that its states are free."""
        if not self._held:
            return
        busy = {id(row.job) for row in self._rows} | self._reader.jobs()
        for job in self._held:
            if id(job) not in busy:
                job.released.set()
        self._held = [job for job in self._held if id(job) in busy]

    def _emit(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.post(batch)

    def _fail(self, job: Job, exc: BaseException) -> None:
        """``job`` ends with ``exc`` (told once; a job its client already left is not told) and its rows go."""
        if not job.cancelled.is_set():
            self._emit(job, Failed(exc))
            job.cancelled.set()
        self._rows = [row for row in self._rows if row.job is not job]

    def _start(self, job: Job, last_logits: list[torch.Tensor]) -> None:
        """``job``'s prompts are read (``last_logits``: each one's logits after its last token): its rows join
        the decode steps; a prompt's ``n`` rows are cloned from its state now."""
        if job.cancelled.is_set():
            return
        try:
            rows = []
            for p_index, (prompt, logits) in enumerate(zip(job.prompts, last_logits, strict=True)):
                gen = job.params.generator(logits.device)
                anchor = self.detok.anchor(prompt.tokens)
                for j in range(job.n):
                    state = prompt.state if j == 0 else prompt.state.clone()
                    job.states.append(state)
                    text = TextStream(self.detok, anchor, job.params.stop)
                    rows.append(Row(job, p_index * job.n + j, state, text, logits, gen))
        except Exception as exc:  # noqa: BLE001 - reported to the request, which rolls back
            self._emit(job, Failed(exc))
            return
        if job.params.max_tokens == 0:
            for row in rows:
                self._emit(job, Finished(row.index, "length", 0))
            self._emit(job, Done())
            return
        job.live = len(rows)
        self._rows.extend(rows)

    def _step(self) -> None:
        started = time.perf_counter()
        self._rows = [row for row in self._rows if not row.job.cancelled.is_set()]
        feed: list[tuple[Row, int]] = []
        rows = list(self._rows)
        for row, token in zip(rows, self._sample_all(rows)):
            if token is None or row.job.cancelled.is_set():
                continue
            try:
                reason = self._account(row, token)
            except Exception as exc:  # noqa: BLE001 - this row's job fails, the others go on
                log.exception("accounting a token failed")
                self._fail(row.job, exc)
                continue
            if reason is None:
                feed.append((row, token))
            else:
                self._finish(row, reason)
        feed = [(row, token) for row, token in feed if not row.job.cancelled.is_set()]
        for adapt in (True, False):
            group = [(row, tok) for row, tok in feed if row.job.adapt is adapt]
            if group:
                self._feed(group, adapt)
        if self.on_step is not None and feed:
            self.on_step(len(feed), time.perf_counter() - started)

    def _sample_all(self, rows: list[Row]) -> list[int | None]:
        """A token per row (None: the row's job failed); rows with plain settings and the same
        temperature/top-p/top-k share one call, and are sampled one by one if that call fails."""
        tokens: dict[int, int | None] = {}
        groups: dict[tuple[float, float, int], list[int]] = {}
        alone: list[int] = []
        for i, row in enumerate(rows):
            p = row.job.params
            if row.generator is None and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
                groups.setdefault((p.temperature, p.top_p, p.top_k), []).append(i)
            else:
                alone.append(i)
        for (temperature, top_p, top_k), members in groups.items():
            try:
                drawn = draw(torch.stack([rows[i].logits for i in members]), temperature, top_p, top_k).tolist()
            except Exception:  # noqa: BLE001 - find the row that breaks it
                alone.extend(members)
                continue
            tokens.update(zip(members, (int(t) for t in drawn)))
        for i in alone:
            row = rows[i]
            try:
                tokens[i] = sample_token(row.logits, row.generated, row.job.params, row.generator)
            except Exception as exc:  # noqa: BLE001 - this row's job fails, the others go on
                log.exception("sampling failed")
                self._fail(row.job, exc)
                tokens[i] = None
        return [tokens[i] for i in range(len(rows))]

    def _account(self, row: Row, token: int) -> str | None:
        """Record ``token`` for ``row``, emit it, and say why the row ends (None: it goes on)."""
        params = row.job.params
        row.generated.append(token)
        logprob, top = 0.0, []
        if params.logprobs is not None:
            lp = torch.log_softmax(row.logits.float(), dim=-1)
            logprob, top = float(lp[token]), top_logprobs(lp, params.logprobs)
        reason = None
        if token in row.job.stop_ids:
            reason, text = "stop", row.text.flush()
        else:
            text, hit = row.text.push(token)
            if hit:
                reason = "stop"
            elif len(row.generated) >= params.max_tokens or row.state.kv_len + 1 > self.max_len:
                reason, text = "length", text + row.text.flush()
        self._emit(row.job, Token(row.index, token, text, logprob, top))
        return reason

    def _finish(self, row: Row, reason: str) -> None:
        self._rows.remove(row)
        job = row.job
        self._emit(job, Finished(row.index, reason, len(row.generated)))
        job.live -= 1
        if job.live == 0:
            self._emit(job, Done())

    def _feed(self, group: list[tuple[Row, int]], adapt: bool) -> None:
        ids = torch.tensor([[tok] for _, tok in group], dtype=torch.long)
        states = [row.state for row, _ in group]
        try:
            logits = self.rt.forward(ids, states if len(states) > 1 else states[0], adapt=adapt)
        except Exception as exc:  # noqa: BLE001 - isolate: retry row by row, only the rows that fail alone fail
            if len(group) == 1:
                log.exception("decode step failed")
                self._fail(group[0][0].job, exc)
                return
            log.warning("batched decode step of %d rows failed (%r); feeding them one by one", len(group), exc)
            for item in group:
                if not item[0].job.cancelled.is_set():
                    self._feed([item], adapt)
            return
        for i, (row, _) in enumerate(group):
            row.logits = logits[i, -1].float()


def _deliver(batch: list[tuple[Job, Event]]) -> None:
    for job, event in batch:
        job.emit(event)
