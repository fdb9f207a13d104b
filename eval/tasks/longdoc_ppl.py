"""longdoc-ppl: per-position NLL on windows of a text file; the first 128 positions are the no-harm check."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from adapt_runtime.eval.episode import Episode
from adapt_runtime.eval.scoring import EpisodeScore
from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.tasks.base import Measures, TaskSpec, log2_bucket, pick, span_mean
from adapt_runtime.eval.text_source import corpus_ids

NO_HARM = 128
LINEAR = 128


def windows(spec: TaskSpec, task: str, ctx_len: int, count: int) -> list[tuple[int, list[int]]]:
    """`count` distinct windows of ctx_len - 1 tokens (room for BOS), chosen by a hashed seed; returned
    with their index in the corpus, sorted by position."""
    need = ctx_len - 1
    ids = corpus_ids(spec.encode, spec.data, spec.seed, need * (count + 1))
    total = len(ids) // need
    if total < 1:
        raise ValueError(f"{task}: the text has {len(ids)} tokens, fewer than one window of {ctx_len}")
    chosen = sorted(rng_for(task, spec.seed, ctx_len).sample(range(total), min(count, total)))
    return [(w, ids[w * need : (w + 1) * need]) for w in chosen]


class LongdocPpl:
    name: ClassVar[str] = "longdoc-ppl"
    summary: ClassVar[str] = (
        "per-position NLL on windows of a text file (--data; synthetic stories without it); "
        "log2 and linear position buckets; positions < 128 are the no-harm check"
    )
    data: ClassVar[str] = "optional"
    headline: ClassVar[str] = "nll"
    lower_is_better: ClassVar[bool] = True

    def episodes(self, spec: TaskSpec) -> list[Episode]:
        out = []
        for ctx_len in pick(spec.ctx_lens, [spec.max_length]):
            for i, (_, ids) in enumerate(windows(spec, self.name, ctx_len, spec.episodes)):
                toks = ([] if spec.bos_id is None else [spec.bos_id]) + ids
                out.append(Episode(self.name, "text", None, ctx_len, i, spec.seed, tuple(toks)))
        return out

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures:
        n = len(ep.tokens)
        nll = score.nll
        m = Measures()
        m.metrics["nll"] = span_mean(nll, (1, n))
        m.metrics["nll_first128"] = span_mean(nll, (1, min(NO_HARM, n)))
        if n > NO_HARM:
            m.metrics["nll_after128"] = span_mean(nll, (NO_HARM, n))
        m.metrics["top1"] = span_mean(score.top1.astype(float), (1, n))
        log2: dict[str, list[float]] = {}
        lin: dict[str, list[float]] = {}
        for p in range(1, n):
            if np.isfinite(nll[p]):
                log2.setdefault(log2_bucket(p), []).append(float(nll[p]))
                lo = (p // LINEAR) * LINEAR
                lin.setdefault(f"{lo}-{lo + LINEAR - 1}", []).append(float(nll[p]))
        m.curves["nll_by_pos_log2"] = {k: float(np.mean(v)) for k, v in log2.items()}
        m.curves["nll_by_pos_linear"] = {k: float(np.mean(v)) for k, v in lin.items()}
        return m
