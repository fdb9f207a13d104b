"""copy: a sequence of words, filler of D tokens, then the same sequence again (delayed copy).

--ctx-len sets the delays D. Metrics on the second copy: NLL (headline), greedy top-1 hit rate, and the
ICL score, NLL(first copy) - NLL(second copy), the gain from having seen the sequence.
"""

from __future__ import annotations

from typing import ClassVar

from adapt_runtime.eval.episode import Encode, Episode, EpisodeBuilder
from adapt_runtime.eval.scoring import EpisodeScore
from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.tasks.base import Measures, TaskSpec, pick, span_mean
from adapt_runtime.eval.words import FILLER, NOUNS, VALUES

LENGTHS = {"len16": 16, "len48": 48}


def filler_text(target: int, encode: Encode) -> str:
    """Filler sentences whose token count is about `target` (0 gives an empty string)."""
    if target <= 0:
        return ""
    sentences = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    text, i = "", 0
    while len(encode(text)) < target:
        text += (" " if text else "") + sentences[i % len(sentences)]
        i += 1
    return text


class CopyTask:
    name: ClassVar[str] = "copy"
    summary: ClassVar[str] = "a word sequence, filler of D tokens (--ctx-len), then the sequence again"
    data: ClassVar[str] = "none"
    headline: ClassVar[str] = "nll"
    lower_is_better: ClassVar[bool] = True

    def episodes(self, spec: TaskSpec) -> list[Episode]:
        out = []
        for variant, n in LENGTHS.items():
            for gap in pick(spec.ctx_lens, (0, 64, 256)):
                filler = filler_text(gap, spec.encode)
                for i in range(spec.episodes):
                    rng = rng_for(self.name, variant, gap, spec.seed, i)
                    seq = " ".join(rng.choice(NOUNS + VALUES) for _ in range(n))
                    b: EpisodeBuilder = spec.builder()
                    b.text(seq + "\n", span="first")
                    if filler:
                        b.text(filler + "\n")
                    b.text(seq, span="second")
                    out.append(b.build(self.name, variant, None, gap, i, spec.seed))
        return out

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures:
        first = (ep.spans["first"][0] + 1, ep.spans["first"][1])
        second = ep.spans["second"]
        nll1, nll2 = span_mean(score.nll, first), span_mean(score.nll, second)
        return Measures({"nll": nll2, "top1": span_mean(score.top1.astype(float), second),
                         "nll_first_copy": nll1, "icl_score": nll1 - nll2})
