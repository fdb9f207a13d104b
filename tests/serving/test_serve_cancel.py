"""A job whose client leaves while its rows decode: the scheduler in-process, on the bundled model.

Cancelling while the prompts are read is tested in ``test_serve_hardening.py`` and ``test_serve_prefill.py``;
here the job is cancelled after its rows have started decoding. Its rows must leave the decode steps at once:
rows that stayed would be sampled and skipped on every step, and the model thread would spin on them forever.
"""

from __future__ import annotations

from typing import Any

import pytest
from adapt_runtime.serving.engine.detokenize import Detokenizer
from adapt_runtime.serving.engine.events import Done, Failed
from adapt_runtime.serving.engine.sampling import SamplingParams
from adapt_runtime.serving.engine.scheduler import Job, Prompt, Scheduler
from scheduler_testing import Collector
from serve_testing import TEST_DEVICE

import adapt_runtime as ar

ROWS = 2  # rows of the cancelled job (n = 2)
LONG = 400  # tokens the cancelled job asks for: it cannot end by itself before the test does
CANCEL_AFTER = 2  # decode steps of the job before its client leaves
AFTER_TOKENS = 4


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    model, tokenizer = ar.load_model("llama", device=TEST_DEVICE)  # ADAPT_TEST_DEVICE=cuda: on the GPU
    return ar.patch(model, rule="hebbian"), tokenizer


def _job(rt: Any, tokenizer: Any, n: int, max_tokens: int) -> Job:
    ids = tokenizer.encode("Once upon a time there was a dog")
    return Job(
        [Prompt(rt.new_state(), ids, ids)],
        n,
        SamplingParams(max_tokens=max_tokens),
        True,
        frozenset(),
        emit=lambda _: None,
    )


def test_a_job_cancelled_mid_decode_leaves_no_active_rows(loaded: tuple[Any, Any]) -> None:
    rt, tokenizer = loaded
    collector = Collector()
    leaving = _job(rt, tokenizer, ROWS, LONG)
    after = _job(rt, tokenizer, 1, AFTER_TOKENS)
    at_cancel: list[tuple[int, int]] = []  # (tokens of the job, active rows) when its client left
    holder: dict[str, Scheduler] = {}

    def post(batch: list[tuple[Job, Any]]) -> None:
        """The scheduler's ``post`` (on the model thread, after a step): once every row of ``leaving`` has decoded
        ``CANCEL_AFTER`` tokens, its client leaves and another job arrives."""
        collector.post(batch)
        if not leaving.cancelled.is_set() and collector.tokens(leaving) >= ROWS * CANCEL_AFTER:
            at_cancel.append((collector.tokens(leaving), holder["scheduler"].active_rows))
            leaving.cancelled.set()
            holder["scheduler"].submit(after)

    scheduler = Scheduler(rt, Detokenizer(tokenizer), rt.max_length, post=post)
    holder["scheduler"] = scheduler
    try:
        scheduler.submit(leaving)
        collector.wait([after])
        assert collector.outcome(after) == "done" and collector.tokens(after) == AFTER_TOKENS
        assert at_cancel == [(ROWS * CANCEL_AFTER, ROWS)], "the job was cancelled mid-decode (its rows active), once"
        assert collector.tokens(leaving) == at_cancel[0][0], "no token of a cancelled job after its client left"
        assert not collector.of(leaving, Done | Failed), "a job whose client left is not told anything"
        assert scheduler.active_rows == 0, "the cancelled job's rows are still in the decode steps"
        assert scheduler.alive
    finally:
        scheduler.close()
    assert not scheduler.alive
