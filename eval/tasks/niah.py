"""niah: a needle ("the special magic number for X is N") at a depth of a filler haystack, then the question.

Variants are depths (0..100% of the haystack), --ctx-len the total lengths. Metrics: accuracy of the
gold number against 9 random 7-digit distractors (summed log-probability), and the number's NLL.
"""

from __future__ import annotations

from typing import ClassVar

from adapt_runtime.eval.episode import Episode
from adapt_runtime.eval.scoring import EpisodeScore
from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.tasks.base import Measures, TaskSpec, pick, query_measures
from adapt_runtime.eval.words import FILLER, NOUNS

DEPTHS = (0, 25, 50, 75, 100)
N_CHOICES = 10
SENTENCES = tuple(s.strip() + "." for s in FILLER.split(".") if s.strip())


class Niah:
    name: ClassVar[str] = "niah"
    summary: ClassVar[str] = "needle in a haystack: a magic number at depth 0-100% of filler; depth x length"
    data: ClassVar[str] = "none"
    headline: ClassVar[str] = "acc"
    lower_is_better: ClassVar[bool] = False

    def episodes(self, spec: TaskSpec) -> list[Episode]:
        lengths = pick(spec.ctx_lens, [n for n in (128, 256, 512) if n <= spec.max_length] or [spec.max_length])
        per_sentence = max(1, len(spec.encode(" ".join(SENTENCES))) // len(SENTENCES))
        out = []
        for length in lengths:
            for depth in DEPTHS:
                for i in range(spec.episodes):
                    ep = self._fit(spec, depth, length, i, per_sentence)
                    if ep is not None:
                        out.append(ep)
        return out

    def _fit(self, spec: TaskSpec, depth: int, length: int, i: int, per_sentence: int) -> Episode | None:
        """The longest haystack whose episode still fits in `length` tokens (None if even 1 sentence fails)."""
        n = max(1, length // per_sentence)
        while n >= 1:
            ep = self._episode(spec, depth, length, i, n)
            if len(ep.tokens) <= length:
                return ep
            n -= max(1, (len(ep.tokens) - length) // per_sentence)
        return None

    def _episode(self, spec: TaskSpec, depth: int, length: int, i: int, n: int) -> Episode:
        rng = rng_for(self.name, depth, length, spec.seed, i)
        word = rng.choice(NOUNS)
        numbers = [str(x) for x in rng.sample(range(10**6, 10**7), N_CHOICES)]
        gold = numbers[0]
        rng.shuffle(numbers)
        hay = [SENTENCES[j % len(SENTENCES)] for j in range(n)]
        cut = round(n * depth / 100)
        b = spec.builder()
        before, after = " ".join(hay[:cut]), " ".join(hay[cut:])
        if before:
            b.text(before + "\n")
        b.text(f"One of the special magic numbers for {word} is: {gold}.\n")
        if after:
            b.text(after + "\n")
        b.text(f"What is the special magic number for {word}? The special magic number for {word} is:")
        b.answer(f" {gold}", [f" {x}" for x in numbers])
        return b.build(self.name, f"depth{depth}", None, length, i, spec.seed)

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures:
        m = query_measures(ep, score)
        m["chance"] = 1.0 / N_CHOICES
        return Measures(m)
