"""label-map: few-shot classification of words into 2 categories with natural, flipped or symbol labels.

Each episode draws 2 categories, `shots` balanced demos `Input: w / Label: l`, and a query on a held-out
word. `natural` labels are the category names, `flipped` swaps them, `symbol` uses unrelated words
(foo, bar, ...), so only the demos tell the mapping. Metric: accuracy over the 2 labels (chance 0.5).
"""

from __future__ import annotations

from typing import ClassVar

from adapt_runtime.eval.episode import Episode
from adapt_runtime.eval.scoring import EpisodeScore
from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.tasks.base import Measures, TaskSpec, pick, query_measures
from adapt_runtime.eval.words import CATEGORIES, SYMBOLS

VARIANTS = ("natural", "flipped", "symbol")
N_CLASSES = 2


class LabelMap:
    name: ClassVar[str] = "label-map"
    summary: ClassVar[str] = "few-shot word classification, 2 classes; labels natural, flipped or symbols"
    data: ClassVar[str] = "none"
    headline: ClassVar[str] = "acc"
    lower_is_better: ClassVar[bool] = False

    def episodes(self, spec: TaskSpec) -> list[Episode]:
        return [self._episode(spec, v, k, i) for v in VARIANTS for k in pick(spec.shots, (0, 1, 2, 4, 8, 16))
                for i in range(spec.episodes)]

    def _episode(self, spec: TaskSpec, variant: str, k: int, i: int) -> Episode:
        rng = rng_for(self.name, variant, k, spec.seed, i)
        cats = rng.sample(sorted(CATEGORIES), N_CLASSES)
        labels = {"natural": cats, "flipped": cats[::-1], "symbol": rng.sample(SYMBOLS, N_CLASSES)}[variant]
        pools = {c: rng.sample(CATEGORIES[c], len(CATEGORIES[c])) for c in cats}
        query_class = rng.randrange(N_CLASSES)
        query_word = pools[cats[query_class]].pop()
        demos = []
        for j in range(k):
            pool = pools[cats[j % N_CLASSES]]
            demos.append((pool[(j // N_CLASSES) % len(pool)], j % N_CLASSES))
        rng.shuffle(demos)
        b = spec.builder()
        for word, j in demos:
            b.text(f"Input: {word}\nLabel: {labels[j]}\n")
        b.text(f"Input: {query_word}\nLabel:")
        b.answer(f" {labels[query_class]}", [f" {lab}" for lab in labels])
        return b.build(self.name, variant, k, None, i, spec.seed)

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures:
        m = query_measures(ep, score)
        m["chance"] = 1.0 / N_CLASSES
        return Measures(m)
