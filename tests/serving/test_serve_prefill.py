"""Long prompts read in pieces between decode steps (``--prefill-chunk``): the scheduler in-process, bundled model.

A recording runtime logs every ``forward`` call (which states, how many tokens), so the tests check the
interleave as an order of calls, not as timing: between two pieces of a prompt the decoding stream takes a step.
Reading in pieces must not change any result: the same greedy completions, prompt scores and session states as
reading each prompt whole (``prefill_chunk=0``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.engine.detokenize import Detokenizer
from adapt_runtime.serving.engine.events import Done, Failed, PromptScored, Token
from adapt_runtime.serving.engine.prompt_reader import PromptReader
from adapt_runtime.serving.engine.sampling import SamplingParams
from adapt_runtime.serving.engine.scheduler import Job, Prompt, Scheduler
from scheduler_testing import Collector
from serve_testing import TEST_DEVICE

import adapt_runtime as ar

CHUNK = 64


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    model, tokenizer = ar.load_model("llama", device=TEST_DEVICE)
    return ar.patch(model, rule="hebbian"), tokenizer


class Recording:
    """The runtime, logging each ``forward`` as (ids of the states fed, tokens per row); ``hook`` sees each call
    before it runs (it may raise, or cancel a job)."""

    def __init__(self, rt: Any, hook: Callable[[list[Any], int], None] | None = None) -> None:
        self.rt, self.hook, self.calls = rt, hook, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rt, name)

    def forward(self, ids: Any, state: Any, adapt: bool = True) -> torch.Tensor:
        states = state if isinstance(state, list) else [state]
        width = len(ids) if isinstance(ids, list) else int(torch.as_tensor(ids).shape[-1])
        self.calls.append((tuple(id(s) for s in states), width))
        if self.hook is not None:
            self.hook(states, width)
        return self.rt.forward(ids, state, adapt=adapt)

    def pieces(self, state: Any) -> list[int]:
        """The widths of the prompt reads of ``state`` (calls of more than one token for it alone)."""
        return [w for ids, w in self.calls if ids == (id(state),) and w > 1]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _job(prompts: list[Prompt], max_tokens: int, n: int = 1, **params: Any) -> Job:
    settings = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    return Job(prompts, n, settings, True, frozenset(), emit=lambda _: None)


def _run(rt: Any, tokenizer: Any, chunk: int, jobs: list[Job]) -> Collector:
    collector = Collector()
    scheduler = Scheduler(rt, Detokenizer(tokenizer), rt.max_length, post=collector.post, prefill_chunk=chunk)
    try:
        for job in jobs:
            scheduler.submit(job)
        collector.wait(jobs)
    finally:
        scheduler.close()
    return collector


def _read_and_decode(rt: Any, tokenizer: Any, chunk: int) -> tuple[list, dict[int, list[int]], list[Any]]:
    """Two prompts (200 tokens echoed, 80 tokens), n=2, 8 greedy tokens: (scores, tokens per row, states)."""
    recording = Recording(rt)
    prompts = [Prompt(rt.new_state(), _ids(200, 1), _ids(200, 1), echo=True),
               Prompt(rt.new_state(), _ids(80, 2), _ids(80, 2))]
    job = _job(prompts, 8, n=2, logprobs=3)
    collector = _run(recording, tokenizer, chunk, [job])
    assert len(collector.of(job, Done)) == 1 and not collector.of(job, Failed)
    widths = recording.pieces(prompts[0].state)
    assert sum(widths) == 200 and max(widths) <= (chunk or 200)
    tokens = {i: [e.token_id for e in collector.of(job, Token) if e.index == i] for i in range(4)}
    return collector.of(job, PromptScored), tokens, job.states


@pytest.fixture(scope="module")
def whole(loaded: tuple[Any, Any]) -> tuple[list, dict[int, list[int]], list[Any]]:
    """The reference: every prompt read in one call (``prefill_chunk=0``, the behaviour before pieces)."""
    return _read_and_decode(*loaded, 0)


@pytest.mark.parametrize("chunk", [CHUNK, 100, 20], ids=["chunk-64", "chunk-100-cut-to-the-rule-chunk",
                                                         "chunk-20-below-the-rule-chunk"])
def test_reading_in_pieces_gives_the_same_completions_scores_and_states(loaded: tuple[Any, Any], whole: tuple,
                                                                        chunk: int) -> None:
    rt, tokenizer = loaded
    scored0, tokens0, states0 = whole
    scored1, tokens1, states1 = _read_and_decode(rt, tokenizer, chunk)
    assert [(s.prompt_index, s.prompt_tokens) for s in scored1] == [(0, 200), (1, 80)]
    assert scored1[1].logprobs is None and len(scored1[0].logprobs) == 200 and scored1[0].logprobs[0] is None
    assert tokens1 == tokens0 and all(len(t) == 8 for t in tokens1.values())
    if chunk % rt.config.chunk_size == 0 or chunk > rt.config.chunk_size:  # pieces end on the rule's chunks
        assert scored1 == scored0
        for a, b in zip(states0, states1, strict=True):
            _assert_same_state(a, b, exact=True)
    else:  # cut inside the rule's chunks: the model sees other shapes, equal up to float rounding
        for a, b in zip(states0, states1, strict=True):
            _assert_same_state(a, b, exact=False)


def _assert_same_state(a: Any, b: Any, exact: bool) -> None:
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        if x is None or y is None:
            return x is y
        return torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-4, atol=1e-5)

    assert a.tokens == b.tokens and a.writes == b.writes > 0 and a.kv_len == b.kv_len
    assert all(same(a.S[layer], b.S[layer]) for layer in a.S)
    assert all(same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True))
    assert same(a.last_logits, b.last_logits)


@pytest.mark.parametrize("chunk", [CHUNK, 0], ids=["in-pieces", "whole-prompts"])
def test_a_decoding_stream_takes_a_step_between_the_pieces_of_long_prompts(loaded: tuple[Any, Any],
                                                                          chunk: int) -> None:
    rt, tokenizer = loaded
    ids = tokenizer.encode("Once upon a time")
    stream = _job([Prompt(rt.new_state(), ids, ids)], 40)
    longs = [_job([Prompt(rt.new_state(), _ids(n, n), _ids(n, n))], 2) for n in (200, 130)]
    scheduler_box: list[Scheduler] = []

    def submit_on_first_decode(states: list[Any], width: int) -> None:  # the stream decodes: the prompts arrive
        if width == 1 and sum(w == 1 for _, w in recording.calls) == 1:
            for job in longs:
                scheduler_box[0].submit(job)

    recording = Recording(rt, submit_on_first_decode)
    collector = Collector()
    scheduler = Scheduler(recording, Detokenizer(tokenizer), rt.max_length, post=collector.post,
                          prefill_chunk=chunk)
    scheduler_box.append(scheduler)
    try:
        scheduler.submit(stream)
        collector.wait([stream, *longs])
    finally:
        scheduler.close()
    assert all(len(collector.of(job, Done)) == 1 for job in (stream, *longs))
    targets = {id(job.prompts[0].state): job for job in longs}
    reads = [(i, ids_[0]) for i, (ids_, w) in enumerate(recording.calls) if w > 1 and ids_[0] in targets]
    for job in longs:
        widths = recording.pieces(job.prompts[0].state)
        assert sum(widths) == len(job.prompts[0].tokens) and max(widths) <= (chunk or 200)
    stream_id = id(stream.prompts[0].state)
    read_between_steps = [0]  # prompt tokens read between two decode steps of the stream
    for ids_, width in recording.calls:
        if width == 1 and stream_id in ids_:
            read_between_steps.append(0)
        elif width > 1 and ids_[0] in targets:
            read_between_steps[-1] += width
    if chunk:
        assert max(read_between_steps) <= chunk, "at most prefill_chunk prompt tokens between two decode steps"
        assert sum(n > 0 for n in read_between_steps) == -(-330 // chunk), "the budget is spent on every step"
        owners = [owner for _, owner in reads]
        assert all(x != y for x, y in zip(owners[:6], owners[1:6])), "pieces alternate while both prompts read"
    else:
        assert len(reads) == 2 and max(read_between_steps) == 330, "whole prompts are read back to back"


def test_a_job_whose_client_left_stops_between_pieces(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    leaving = _job([Prompt(rt.new_state(), _ids(150, 3), _ids(150, 3))], 4)

    def leave_after_first_piece(states: list[Any], width: int) -> None:
        if states[0] is leaving.prompts[0].state:
            leaving.cancelled.set()

    recording = Recording(rt, leave_after_first_piece)
    ids = tokenizer.encode("Once upon a time there was a dog")
    after = _job([Prompt(rt.new_state(), ids, ids)], 4)
    collector = Collector()
    scheduler = Scheduler(recording, Detokenizer(tokenizer), rt.max_length, post=collector.post,
                          prefill_chunk=CHUNK)
    try:
        scheduler.submit(leaving)
        scheduler.submit(after)
        collector.wait([after])
    finally:
        scheduler.close()
    assert recording.pieces(leaving.prompts[0].state) == [CHUNK], "no piece is read after the client left"
    assert not collector.of(leaving, Token) and not collector.of(leaving, PromptScored)
    assert len(collector.of(after, Token)) == 4


def test_a_piece_that_fails_fails_only_its_job(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    ids = tokenizer.encode("Once upon a time")
    stream = _job([Prompt(rt.new_state(), ids, ids)], 60)
    broken = _job([Prompt(rt.new_state(), _ids(150, 4), _ids(150, 4))], 4)

    def fail_second_piece(states: list[Any], width: int) -> None:
        if states[0] is broken.prompts[0].state and len(recording.pieces(states[0])) == 2:
            raise RuntimeError("broken piece")

    recording = Recording(rt, fail_second_piece)
    collector = _run(recording, tokenizer, CHUNK, [stream, broken])
    assert len(collector.of(stream, Token)) == 60 and len(collector.of(stream, Done)) == 1
    failed = collector.of(broken, Failed)
    assert len(failed) == 1 and "broken piece" in str(failed[0].error)
    assert not collector.of(broken, Token) and not collector.of(broken, Done)
    assert len(recording.pieces(broken.prompts[0].state)) == 2, "the failed job reads no further piece"


def test_prefill_chunk_must_not_be_negative(loaded: tuple[Any, Any]) -> None:
    with pytest.raises(ValueError, match="prefill_chunk"):
        ServerConfig(prefill_chunk=-1)
    with pytest.raises(ValueError, match="prefill_chunk"):
        PromptReader(loaded[0], -5, lambda job, event: None, lambda job, exc: None)
    assert ServerConfig(prefill_chunk=0).prefill_chunk == 0


class RecordingLast(Recording):
    """A recording runtime whose ``forward`` takes ``logits``, so the reader batches the pieces that read no
    scores."""

    def forward(self, ids: Any, state: Any, adapt: bool = True, logits: str = "all") -> torch.Tensor:
        states = state if isinstance(state, list) else [state]
        width = len(ids) if isinstance(ids, list) else int(torch.as_tensor(ids).shape[-1])
        self.calls.append((tuple(id(s) for s in states), width))
        if self.hook is not None:
            self.hook(states, width)
        return self.rt.forward(ids, state, adapt=adapt, logits=logits)


def _three_jobs(rt: Any) -> list[Job]:
    """Three sessions reading 96-token prompts at once (one mid-chunk), 6 greedy tokens each."""
    jobs = []
    for seed in range(3):
        state = rt.new_state()
        if seed == 1:
            rt.forward(_ids(5, 40), state)  # its chunk boundaries fall elsewhere than the others'
        jobs.append(_job([Prompt(state, _ids(96, 10 + seed), _ids(96, 10 + seed))], 6))
    return jobs


def test_pieces_of_one_length_are_read_in_one_call_as_each_would_be_alone(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    together, recording = _three_jobs(rt), RecordingLast(rt)
    collector = _run(recording, tokenizer, 0, together)
    batched = [ids for ids, width in recording.calls if width == 96]
    assert batched == [tuple(id(job.prompts[0].state) for job in together)], recording.calls
    for twin, job in zip(together, _three_jobs(rt), strict=True):  # the same jobs, each alone
        alone = _run(RecordingLast(rt), tokenizer, 0, [job])
        assert [e.token_id for e in alone.of(job, Token)] == [e.token_id for e in collector.of(twin, Token)]
        for layer, S in job.states[0].S.items():
            if S is not None:
                torch.testing.assert_close(twin.states[0].S[layer], S, rtol=1e-5, atol=1e-6)
        assert twin.states[0].writes == job.states[0].writes and twin.states[0].tokens == job.states[0].tokens


def test_a_batched_read_that_fails_is_retried_alone_and_fails_only_its_job(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    jobs = _three_jobs(rt)
    broken = jobs[1].prompts[0].state

    def fail_with_broken(states: list[Any], width: int) -> None:
        if any(s is broken for s in states):
            raise RuntimeError("broken row")

    recording = RecordingLast(rt, fail_with_broken)
    collector = _run(recording, tokenizer, 0, jobs)
    assert len(collector.of(jobs[1], Failed)) == 1 and not collector.of(jobs[1], Token)
    for job in (jobs[0], jobs[2]):
        assert len(collector.of(job, Token)) == 6 and len(collector.of(job, Done)) == 1
    reads = [(ids, width) for ids, width in recording.calls if width == 96]
    assert len(reads[0][0]) == 3 and all(len(ids) == 1 for ids, _ in reads[1:])  # once together, then alone
