"""Test helper: ``Collector``, the in-process scheduler's ``post`` that keeps each job's events and waits for jobs
to end (``Done`` or ``Failed``)."""

from __future__ import annotations

import threading

from adapt_runtime.serving.engine.events import Done, Event, Failed, Token
from adapt_runtime.serving.engine.scheduler import Job

WAIT_S = 60.0


class Collector:
    """The scheduler's ``post``: events per job, and a wait for every job to end."""

    def __init__(self) -> None:
        self.events: dict[int, list[Event]] = {}
        self._cond = threading.Condition()

    def post(self, batch: list[tuple[Job, Event]]) -> None:
        with self._cond:
            for job, event in batch:
                self.events.setdefault(id(job), []).append(event)
            self._cond.notify_all()

    def ended(self, job: Job) -> bool:
        return any(isinstance(e, Done | Failed) for e in self.events.get(id(job), []))

    def wait(self, jobs: list[Job], timeout: float = WAIT_S) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: all(self.ended(j) for j in jobs), timeout):
                raise AssertionError("a job never ended: the model thread hung or died")

    def of(self, job: Job, kind: type) -> list:
        """``job``'s events of type ``kind``, in order."""
        return [e for e in self.events.get(id(job), []) if isinstance(e, kind)]

    def outcome(self, job: Job) -> str:
        ends = self.of(job, Done | Failed)
        assert len(ends) == 1, f"a job must end exactly once, got {ends}"
        return "done" if isinstance(ends[0], Done) else "failed"

    def tokens(self, job: Job) -> int:
        return len(self.of(job, Token))
