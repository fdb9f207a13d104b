"""What a task is: a generator of episodes and a measure of one scored episode.

A task turns a TaskSpec (shots, context lengths, episode count, seed, optional data file, tokenizer) into
episodes, identical for every rule, and turns one EpisodeScore into per-episode metrics and curves. The
harness pairs these per-episode values across rules, so a CI over episodes is clustered by episode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from adapt_runtime.eval.episode import Encode, Episode, EpisodeBuilder
from adapt_runtime.eval.scoring import EpisodeScore


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs to generate its episodes. None means "the task's default"."""

    encode: Encode
    bos_id: int | None
    max_length: int
    episodes: int
    seed: int
    shots: tuple[int, ...] | None = None
    ctx_lens: tuple[int, ...] | None = None
    data: Path | None = None

    def builder(self) -> EpisodeBuilder:
        return EpisodeBuilder(self.encode, self.bos_id)


@dataclass
class Measures:
    """Per-episode metric values, and curves as {curve name: {x label: value}}."""

    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, dict[str, float]] = field(default_factory=dict)


class Task(Protocol):
    name: ClassVar[str]
    summary: ClassVar[str]
    data: ClassVar[str]  # "none", "optional" or "required": how the task uses --data
    headline: ClassVar[str]  # the metric the printed summary shows
    lower_is_better: ClassVar[bool]

    def episodes(self, spec: TaskSpec) -> list[Episode]: ...

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures: ...


def span_mean(values: np.ndarray, span: tuple[int, int]) -> float:
    """Mean over the finite values in [a, b); NaN for an empty span."""
    seg: np.ndarray = values[span[0] : span[1]].astype(float)
    seg = seg[np.isfinite(seg)]
    return float(seg.mean()) if seg.size else math.nan


def query_measures(ep: Episode, score: EpisodeScore) -> dict[str, float]:
    """acc: share of multiple-choice queries won by the gold answer; answer_nll: mean per-token NLL of
    the gold answers; both averaged within the episode (one value per episode)."""
    out: dict[str, float] = {}
    correct = [s.correct for s in score.queries if s.correct is not None]
    if correct:
        out["acc"] = float(np.mean(correct))
    nlls = [span_mean(score.nll, (q.start, q.end)) for q in ep.queries]
    if nlls:
        out["answer_nll"] = float(np.nanmean(nlls))
    return out


def distance_curve(ep: Episode, score: EpisodeScore) -> dict[str, float]:
    """Accuracy of multiple-choice queries by log2 bucket of their key-to-query token distance."""
    buckets: dict[str, list[bool]] = {}
    for q, s in zip(ep.queries, score.queries):
        if q.distance is not None and s.correct is not None:
            buckets.setdefault(log2_bucket(max(q.distance, 1)), []).append(s.correct)
    return {k: float(np.mean(v)) for k, v in buckets.items()}


def log2_bucket(p: int) -> str:
    """1, 2-3, 4-7, ...: the log2 position bucket holding p (p >= 1)."""
    lo = 1 << (p.bit_length() - 1)
    return str(lo) if lo == 1 else f"{lo}-{2 * lo - 1}"


def bucket_start(label: str) -> int:
    return int(label.split("-")[0])


def pick(values: Sequence[int] | None, default: Sequence[int]) -> tuple[int, ...]:
    return tuple(values) if values else tuple(default)
