"""assoc-recall: `key: value` lines, then queries `key:` answered by the bound value (MQAR in words).

Shots are the number of pairs. Queries ask up to 8 of the keys in a hashed-random order, so their
key-to-query distances vary; variant `gap` puts filler text between the pairs and the queries. Metrics:
multiple-choice accuracy over the episode's values, the gold answer's NLL, and accuracy by distance.
"""

from __future__ import annotations

from typing import ClassVar

from adapt_runtime.eval.episode import Episode
from adapt_runtime.eval.scoring import EpisodeScore
from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.tasks.base import Measures, TaskSpec, distance_curve, pick, query_measures
from adapt_runtime.eval.words import FILLER, NOUNS, VALUES

VARIANTS = ("base", "gap")
MAX_QUERIES = 8
GAP_REPEATS = 3


class AssocRecall:
    name: ClassVar[str] = "assoc-recall"
    summary: ClassVar[str] = "key: value lines, then up to 8 queries; variants base and gap (filler before queries)"
    data: ClassVar[str] = "none"
    headline: ClassVar[str] = "acc"
    lower_is_better: ClassVar[bool] = False

    def episodes(self, spec: TaskSpec) -> list[Episode]:
        out = []
        for variant in VARIANTS:
            for k in pick(spec.shots, (1, 2, 4, 8, 16)):
                if k < 1:
                    continue  # no pairs: nothing to recall
                for i in range(spec.episodes):
                    out.append(self._episode(spec, variant, k, i))
        return out

    def _episode(self, spec: TaskSpec, variant: str, k: int, i: int) -> Episode:
        rng = rng_for(self.name, variant, k, spec.seed, i)
        keys = rng.sample(NOUNS, min(k, len(NOUNS)))
        values = rng.sample(VALUES, k) if k <= len(VALUES) else [rng.choice(VALUES) for _ in keys]
        b = spec.builder()
        line_end = {}
        for key, value in zip(keys, values):
            line_end[key] = b.text(f"{key}: {value}\n")[1]
        if variant == "gap":
            b.text(" ".join([FILLER] * GAP_REPEATS) + "\n")
        choices = [f" {v}" for v in dict.fromkeys(values)]
        bound = dict(zip(keys, values))
        for key in rng.sample(keys, min(len(keys), MAX_QUERIES)):
            start = b.text(f"{key}:")[1]
            b.answer(f" {bound[key]}", choices, distance=start - line_end[key])
            b.text("\n")
        return b.build(self.name, variant, k, None, i, spec.seed)

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures:
        m = Measures(query_measures(ep, score))
        m.curves["acc_by_distance"] = distance_curve(ep, score)
        return m
