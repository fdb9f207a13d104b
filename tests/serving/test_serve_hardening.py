"""The model thread never dies and one row never fails the batch: the scheduler in-process, on the bundled model.

Each test drives a real ``Scheduler`` with jobs whose events are collected per job; a job ends with ``Done`` or
``Failed``. Before these fixes a sampling error or a broken row ended the thread (every later job hung) or
failed every job of the decode step.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from adapt_runtime.serving.engine.detokenize import Detokenizer
from adapt_runtime.serving.engine.events import Failed, Token
from adapt_runtime.serving.engine.sampling import SamplingParams, draw, penalised
from adapt_runtime.serving.engine.scheduler import Job, Prompt, Scheduler
from scheduler_testing import Collector
from serve_testing import TEST_DEVICE

import adapt_runtime as ar

TOKENS = 6
WAIT_S = 60.0


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    model, tokenizer = ar.load_model("llama", device=TEST_DEVICE)  # ADAPT_TEST_DEVICE=cuda: on the GPU
    return ar.patch(model, rule="hebbian"), tokenizer


def _job(rt: Any, tokenizer: Any, text: str = "Once upon a time there was a dog", state: Any = None,
         **params: Any) -> Job:
    ids = tokenizer.encode(text)
    state = state if state is not None else rt.new_state()
    settings = SamplingParams(max_tokens=params.pop("max_tokens", TOKENS), **params)
    return Job([Prompt(state, ids, ids)], 1, settings, True, frozenset(), emit=lambda _: None)


def _scheduler(rt: Any, tokenizer: Any, collector: Collector, **kwargs: Any) -> Scheduler:
    return Scheduler(rt, Detokenizer(tokenizer), rt.max_length, post=collector.post, **kwargs)


@pytest.mark.parametrize("settings", [{"temperature": 1e-40}, {"top_p": 1e-300},
                                      {"temperature": 1e-39, "top_p": 5e-324},
                                      {"temperature": 1e-40, "seed": 7}, {"top_p": 1e-300, "presence_penalty": 1.0}],
                         ids=["tiny-temperature", "tiny-top-p", "both", "tiny-temperature-seeded",
                              "tiny-top-p-penalised"])
def test_every_accepted_sampling_value_generates(loaded: tuple[Any, Any], settings: dict) -> None:
    rt, tokenizer = loaded
    collector = Collector()
    scheduler = _scheduler(rt, tokenizer, collector)
    try:
        job = _job(rt, tokenizer, **settings)
        scheduler.submit(job)
        collector.wait([job])
        assert collector.outcome(job) == "done"
        assert collector.tokens(job) == TOKENS
        assert scheduler.alive
    finally:
        scheduler.close()


def test_tiny_temperature_is_greedy_and_tiny_top_p_keeps_the_best_token() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    best = logits.argmax(-1)
    assert torch.equal(draw(logits, 1e-40, 1.0, 0), best)
    assert torch.equal(draw(logits, 1.0, 1e-300, 0), best)
    assert torch.equal(draw(logits, 0.7, 1e-300, 5, torch.Generator().manual_seed(1)), best)


def test_penalties_and_seeded_draws_stay_on_the_logits_device() -> None:
    device = torch.device(TEST_DEVICE or "cpu")
    logits = torch.zeros(8, dtype=torch.float64, device=device)
    params = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25, seed=3)
    out = penalised(logits, [2, 2, 5], params)
    assert out.device == logits.device and out.dtype == logits.dtype
    assert out[2].item() == pytest.approx(-1.0) and out[5].item() == pytest.approx(-0.75) and out[0].item() == 0.0
    generator = params.generator(device)
    assert generator is not None and generator.device.type == device.type
    first = draw(logits.float()[None], 1.0, 1.0, 0, generator)
    assert first.device.type == device.type
    assert torch.equal(first, draw(logits.float()[None], 1.0, 1.0, 0, params.generator(device)))


def test_a_row_that_breaks_sampling_fails_alone(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    broken = rt.new_state()
    ids = tokenizer.encode("The cat sat")
    rt.forward(ids, broken)
    broken.last_logits = torch.full_like(broken.last_logits, float("nan"))
    collector = Collector()
    scheduler = _scheduler(rt, tokenizer, collector)
    try:
        good = [_job(rt, tokenizer, f"Once upon a time there was a {w}") for w in ("dog", "cat")]
        bad = Job([Prompt(broken, [], ids)], 1, SamplingParams(max_tokens=TOKENS), True, frozenset(),
                  emit=lambda _: None)
        for job in (good[0], bad, good[1]):
            scheduler.submit(job)
        collector.wait([*good, bad])
        assert [collector.outcome(j) for j in good] == ["done", "done"]
        assert collector.outcome(bad) == "failed"
        assert all(collector.tokens(j) == TOKENS for j in good)
        later = _job(rt, tokenizer)
        scheduler.submit(later)
        collector.wait([later])
        assert collector.outcome(later) == "done" and scheduler.alive
    finally:
        scheduler.close()


class BreakingRuntime:
    """The runtime, holding every call until ``go`` is set, whose batched decode calls raise while ``bad`` is
    among the rows (and, with ``alone``, also when ``bad`` is fed by itself)."""

    def __init__(self, rt: Any, alone: bool) -> None:
        self.rt, self.alone = rt, alone
        self.bad: Any = None
        self.go = threading.Event()
        self.batched_failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rt, name)

    def forward(self, ids: Any, state: Any, adapt: bool = True) -> torch.Tensor:
        self.go.wait(WAIT_S)
        states = state if isinstance(state, list) else [state]
        if torch.is_tensor(ids) and ids.shape[-1] == 1 and any(s is self.bad for s in states):
            if len(states) > 1:
                self.batched_failures += 1
                raise RuntimeError("this row's state breaks the step")
            if self.alone:
                raise RuntimeError("this row's state breaks the step")
        return self.rt.forward(ids, state, adapt=adapt)


@pytest.mark.parametrize("alone", [True, False], ids=["fails-alone-too", "only-in-a-batch"])
def test_a_row_that_breaks_the_decode_batch_fails_alone(loaded: tuple[Any, Any], alone: bool) -> None:
    rt, tokenizer = loaded
    breaking = BreakingRuntime(rt, alone)
    collector = Collector()
    scheduler = _scheduler(breaking, tokenizer, collector)
    try:
        jobs = [_job(rt, tokenizer, f"Once upon a time there was a {w}") for w in ("dog", "cat", "frog", "bird")]
        breaking.bad = jobs[1].prompts[0].state
        for job in jobs:
            scheduler.submit(job)
        breaking.go.set()
        collector.wait(jobs)
        assert breaking.batched_failures > 0, "the probe must break a batched step"
        others = [jobs[0], *jobs[2:]]
        assert [collector.outcome(j) for j in others] == ["done"] * 3
        assert all(collector.tokens(j) == TOKENS for j in others)
        assert collector.outcome(jobs[1]) == ("failed" if alone else "done")
        assert scheduler.alive
    finally:
        scheduler.close()


def test_a_state_whose_kv_outgrows_its_counter_does_not_fail_the_batch(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    collector = Collector()
    scheduler = _scheduler(rt, tokenizer, collector)
    try:
        jobs = [_job(rt, tokenizer, f"Once upon a time there was a {w}") for w in ("dog", "cat", "frog", "bird")]
        broken = jobs[2].prompts[0]
        rt.forward(broken.feed, broken.state)
        broken.state.kv_tokens -= 3  # the KV cache is now longer than its counter says
        jobs[2] = Job([Prompt(broken.state, [], broken.tokens)], 1, jobs[2].params, True, frozenset(),
                      emit=lambda _: None)
        for job in jobs:
            scheduler.submit(job)
        collector.wait(jobs)
        others = [jobs[0], jobs[1], jobs[3]]
        assert [collector.outcome(j) for j in others] == ["done"] * 3
        assert all(collector.tokens(j) == TOKENS for j in others)
    finally:
        scheduler.close()


def test_an_error_that_escapes_a_step_fails_its_jobs_and_the_thread_lives_on(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    calls = []

    def on_step(rows: int, seconds: float) -> None:
        calls.append(rows)
        if len(calls) == 1:
            raise RuntimeError("a bug in a step")

    collector = Collector()
    scheduler = _scheduler(rt, tokenizer, collector, on_step=on_step)
    try:
        first = _job(rt, tokenizer)
        scheduler.submit(first)
        collector.wait([first])
        assert collector.outcome(first) == "failed"
        time.sleep(0.05)
        assert scheduler.alive
        second = _job(rt, tokenizer)
        scheduler.submit(second)
        collector.wait([second])
        assert collector.outcome(second) == "done" and collector.tokens(second) == TOKENS
        assert isinstance(collector.events[id(first)][-1], Failed), "nothing follows a job's failure"
    finally:
        scheduler.close()
    assert not scheduler.alive


class CountingRuntime:
    """The runtime, counting prompt reads (calls of more than one token) and cancelling ``job`` after the first."""

    def __init__(self, rt: Any) -> None:
        self.rt, self.job, self.reads = rt, None, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rt, name)

    def forward(self, ids: Any, state: Any, adapt: bool = True) -> torch.Tensor:
        if len(ids) > 1:
            self.reads += 1
            if self.job is not None:
                self.job.cancelled.set()  # the client leaves while the first prompt is read
        return self.rt.forward(ids, state, adapt=adapt)


def test_a_job_whose_client_left_stops_reading_its_prompts(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    counting = CountingRuntime(rt)
    collector = Collector()
    scheduler = _scheduler(counting, tokenizer, collector)
    try:
        ids = tokenizer.encode("Once upon a time there was a dog")
        job = Job([Prompt(rt.new_state(), ids, ids) for _ in range(6)], 2, SamplingParams(max_tokens=TOKENS),
                  True, frozenset(), emit=lambda _: None)
        counting.job = job
        scheduler.submit(job)
        after = _job(rt, tokenizer)
        scheduler.submit(after)
        collector.wait([after])
        assert counting.reads == 2, "after its client left, none of the job's other prompts may be read"
        assert not any(isinstance(e, Token) for e in collector.events.get(id(job), []))
    finally:
        scheduler.close()
