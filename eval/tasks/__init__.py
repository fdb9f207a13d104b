"""The adapt-eval tasks, by name. Each task is one file; `get_task` raises with the list of known names."""

from __future__ import annotations

from adapt_runtime.eval.tasks.assoc_recall import AssocRecall
from adapt_runtime.eval.tasks.babi import Babi
from adapt_runtime.eval.tasks.base import Task, TaskSpec
from adapt_runtime.eval.tasks.copy_task import CopyTask
from adapt_runtime.eval.tasks.label_map import LabelMap
from adapt_runtime.eval.tasks.long_memory import LongMemory
from adapt_runtime.eval.tasks.longdoc_ppl import LongdocPpl
from adapt_runtime.eval.tasks.niah import Niah
from adapt_runtime.eval.tasks.session_memory import SessionMemory

TASKS: dict[str, Task] = {
    t.name: t
    for t in (LongdocPpl(), SessionMemory(), AssocRecall(), CopyTask(), LabelMap(), Niah(), Babi(), LongMemory())
}


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "TaskSpec", "get_task"]
