"""Engine: the runtime, its tokenizer and the scheduler, seen from the event loop.

``plan`` decides what of a prompt still has to be read into a state (the session semantics), ``run`` submits a
job to the model thread and yields its events; closing the iterator early cancels the job.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

from adapt_runtime.serving.config import DEFAULT_PREFILL_CHUNK
from adapt_runtime.serving.engine.detokenize import Detokenizer
from adapt_runtime.serving.engine.events import Done, Event, Failed
from adapt_runtime.serving.engine.scheduler import Job, Prompt, Scheduler
from adapt_runtime.serving.failures import InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import FastWeights

POLL_S = 0.001


class Engine:
    """The native engine (an ``EngineProtocol``): jobs run on the scheduler's model thread."""

    def __init__(self, runtime: Runtime, tokenizer: PreTrainedTokenizerBase, max_model_len: int | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> None:
        self.rt = runtime
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer)
        self.max_len = min(runtime.max_length, max_model_len or runtime.max_length)
        self.vocab_size = runtime.vocab_size
        self.eos_ids = _eos_ids(runtime, tokenizer)
        self.scheduler = Scheduler(runtime, self.detok, self.max_len, on_step, post=self._post,
                                   prefill_chunk=prefill_chunk)
        self._lock = threading.Lock()
        self._pending: list[tuple[Job, Event]] = []
        self._runs = 0
        self._poller: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        """Whether the model thread runs (``/health``)."""
        return self.scheduler.alive

    def close(self) -> None:
        self.scheduler.close()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                                 "invalid_token_id", param)
        return ids

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidRequest("the prompt is empty after tokenization", "empty_prompt", "prompt")
        if prompt_len + max_tokens > self.max_len:
            raise InvalidRequest(
                f"this model's maximum context length is {self.max_len} tokens; the request has {prompt_len} "
                f"prompt tokens and asks for {max_tokens} more",
                "context_length_exceeded",
                "max_tokens" if prompt_len < self.max_len else "prompt",
            )

    def plan(self, state: FastWeights, tokens: list[int], echo: bool, max_tokens: int) -> Prompt:
        """Decide what ``state`` must still read of ``tokens``.

        If the prompt extends what the state's KV cache holds, only the new suffix is read. Otherwise (a
        diverging prompt, an evicted KV, ``echo`` scoring, or no room left for the suffix and the answer), the
        KV is dropped and the whole prompt is read again: the fast weights continue with the new text.
        """
        kv = state.kv_len
        visible = state.tokens[len(state.tokens) - kv :] if kv else []
        extends = bool(visible) and tokens[: len(visible)] == visible
        suffix = tokens[len(visible) :]
        fits = kv + len(suffix) + max_tokens <= self.max_len
        resumable = bool(suffix) or state.last_logits is not None
        if extends and fits and resumable and not echo:
            return Prompt(state, suffix, tokens)
        if kv or state.tokens:
            state.drop_kv()
        return Prompt(state, list(tokens), tokens, echo=echo)

    def stop_ids(self, extra: list[int] | None, ignore_eos: bool) -> frozenset[int]:
        base = set() if ignore_eos else set(self.eos_ids)
        return frozenset(base | set(extra or ()))

    async def run(self, job: Job) -> AsyncGenerator[Event, None]:
        """Submit ``job`` and yield its events up to ``Done`` or ``Failed``; leaving early cancels it. Either way
        the run ends only once the model thread holds the job no more, so its states are the caller's alone again
        (a turn rolls them back in place)."""
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        job.emit = inbox.put_nowait
        self._runs += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        self.scheduler.submit(job)
        try:
            while True:
                event = await inbox.get()
                yield event
                if isinstance(event, Done | Failed):
                    return
        finally:
            job.cancelled.set()
            while not job.released.is_set() and self.scheduler.alive:
                await asyncio.sleep(POLL_S)
            self._runs -= 1

    def _post(self, batch: list[tuple[Job, Event]]) -> None:
        """From the model thread: queue a step's events for the poller (no syscall, no GIL hand-over)."""
        with self._lock:
            self._pending.extend(batch)

    async def _poll(self) -> None:
        """On the event loop, while any request runs: hand queued events to their requests every
        ``POLL_S``. Polling costs a few microseconds a tick; waking the loop from the model thread instead
        cost the model thread a GIL hand-over per decode step (about 15% of its time at 8 sessions)."""
        while self._runs > 0:
            self._drain()
            await asyncio.sleep(POLL_S)
        self._drain()

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for job, event in batch:
            job.emit(event)


def _eos_ids(runtime: Runtime, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(runtime.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    return tuple(sorted(ids))
