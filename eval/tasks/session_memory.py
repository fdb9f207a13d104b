"""session-memory: read a text in turn 1, then score it in turn 2 with no attention context.

Variant `seen` scores the same text again; `unseen` scores another text of the same source, so the gap
between the two separates memory of the text from adaptation to its domain. Turn 2 runs on a fresh
attention cache (`drop_kv`), so anything it remembers of turn 1 lives in the fast weights.
"""

from __future__ import annotations

from typing import ClassVar

from adapt_runtime.eval.episode import Episode
from adapt_runtime.eval.scoring import EpisodeScore
from adapt_runtime.eval.tasks.base import Measures, TaskSpec, pick, span_mean
from adapt_runtime.eval.tasks.longdoc_ppl import windows

VARIANTS = ("seen", "unseen")


class SessionMemory:
    name: ClassVar[str] = "session-memory"
    summary: ClassVar[str] = (
        "a text read in turn 1, scored in turn 2 with no context (seen), against another text of the "
        "same source (unseen); --data, synthetic stories without it"
    )
    data: ClassVar[str] = "optional"
    headline: ClassVar[str] = "nll"
    lower_is_better: ClassVar[bool] = True

    def episodes(self, spec: TaskSpec) -> list[Episode]:
        out = []
        bos = [] if spec.bos_id is None else [spec.bos_id]
        for ctx_len in pick(spec.ctx_lens, [min(256, spec.max_length)]):
            pool = windows(spec, self.name, ctx_len, 2 * spec.episodes)
            if len(pool) < 2:
                raise ValueError(f"{self.name}: the text holds fewer than two windows of {ctx_len} tokens")
            for i in range(min(spec.episodes, len(pool) // 2)):
                # neighbours in corpus order, so seen and unseen come from the same part of the source
                first, other = pool[2 * i][1], pool[2 * i + 1][1]
                for variant, second in zip(VARIANTS, (first, other)):
                    t1, t2 = bos + first, bos + second
                    n1 = len(t1)
                    out.append(Episode(self.name, variant, None, ctx_len, i, spec.seed, tuple(t1 + t2),
                                       spans={"first_read": (1, n1), "turn2": (n1 + 1, n1 + len(t2))},
                                       breaks=(n1,)))
        return out

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures:
        return Measures({"nll": span_mean(score.nll, ep.spans["turn2"]),
                         "nll_first_read": span_mean(score.nll, ep.spans["first_read"])})
