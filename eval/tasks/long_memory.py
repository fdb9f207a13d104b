"""long-memory: read a document of many context windows, drop the KV, then probe what the fast weights hold.

An episode is a document of N tokens (``--ctx-len``, default 2000 and 5000) cut into turns of one context window
(the attention cache is dropped between them), then probe turns, each in a fresh context:
  * seen passages: 64 tokens of the document that ended ``d`` tokens before its end (d = 0, 1k, 2k, 5k, ...);
  * unseen passages: 64 tokens of the same source that were not read;
  * planted needles: a sentence ("The secret number of the tiger is 4821.") put into the document at depths
    10/50/90%, probed by the NLL of its number given its first half, and by the number against 9 distractors.
The document is read with ``rt.read`` (adapting, except under the baseline ``none``, whose fast weights stay 0:
the fresh state). Probes never write (``adapt=False``), so no probe sees another. Each probe is also scored on a
control state: per layer, a random direction with the norm of the read state's S, so that a gain over the
control is memory of the document rather than an effect of the norm. Metrics are per episode, paired across
rules by the harness (deltas vs ``none`` = vs a fresh state); ``*_vs_control`` are control NLL minus NLL
(positive: the state holds more than its norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from adapt_runtime.eval.episode import Episode, Query
from adapt_runtime.eval.scoring import EpisodeScore, score_episode
from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.tasks.base import Measures, TaskSpec, pick, span_mean
from adapt_runtime.eval.text_source import corpus_ids
from adapt_runtime.eval.words import NOUNS

PROBE = 64
DISTANCES = (0, 1000, 2000, 5000, 10000, 20000)
UNSEEN = 3
DEPTHS = (10, 50, 90)
N_CHOICES = 10
MAX_WINDOW = 512


@dataclass
class LongMemoryScore(EpisodeScore):
    """The probes scored on the read state (``nll``, ``queries``) and on its random-direction control."""

    control: EpisodeScore | None = None


def random_control(state: Any, seed: int) -> Any:
    """A copy of ``state`` whose S has, per layer, the same Frobenius norm in a random direction."""
    out = state.clone()
    gen = torch.Generator().manual_seed(seed)
    for layer, S in out.S.items():
        if S is not None:
            R = torch.randn(S.shape, generator=gen, dtype=torch.float32).to(S)
            norm = torch.linalg.vector_norm(S.float())
            out.S[layer] = R * (norm / torch.linalg.vector_norm(R.float()).clamp_min(1e-30)).to(S.dtype)
    out.bump()
    return out


def _tail(encode: Any, prefix: str, piece: str) -> tuple[int, ...]:
    head, full = encode(prefix), encode(prefix + piece)
    if full[: len(head)] != head:
        raise ValueError(f"long-memory: {piece!r} re-tokenized its prefix")
    return tuple(full[len(head) :])


class LongMemory:
    name: ClassVar[str] = "long-memory"
    summary: ClassVar[str] = (
        "read N tokens (--ctx-len, many windows), drop the KV; seen passages by distance, unseen passages, "
        "planted needles, vs fresh and vs a random-direction state of equal norm; --data or synthetic stories"
    )
    data: ClassVar[str] = "optional"
    headline: ClassVar[str] = "seen_nll"
    lower_is_better: ClassVar[bool] = True
    quick: ClassVar[bool] = False  # thousands of tokens per episode: not in the quick preset (run it by --task)

    def episodes(self, spec: TaskSpec) -> list[Episode]:
        window = min(spec.max_length, MAX_WINDOW)
        window -= window % 64 if window >= 64 else 0
        out = []
        for n in pick(spec.ctx_lens, (2000, 5000)):
            if n < 4 * PROBE:
                raise ValueError(f"{self.name}: --ctx-len {n} is too short; documents need >= {4 * PROBE} tokens")
            need = n + (UNSEEN + 1) * PROBE
            ids = corpus_ids(spec.encode, spec.data, spec.seed, need * spec.episodes)
            if len(ids) < need:
                raise ValueError(f"{self.name}: the text has {len(ids)} tokens; a {n}-token document needs {need}")
            step = (len(ids) - need) // max(1, spec.episodes - 1) if spec.episodes > 1 else 0
            for i in range(spec.episodes):
                out.append(self._episode(spec, ids[i * step : i * step + need], n, window, i))
        return out

    def _episode(self, spec: TaskSpec, ids: list[int], n: int, window: int, i: int) -> Episode:
        rng = rng_for(self.name, spec.seed, n, i)
        bos = [] if spec.bos_id is None else [spec.bos_id]
        doc = bos + ids[: n - len(bos)]
        needles = []
        for depth, word in zip(DEPTHS, rng.sample(NOUNS, len(DEPTHS))):
            numbers = [str(x) for x in rng.sample(range(1000, 10000), N_CHOICES)]
            prefix = f"The secret number of the {word} is"
            sentence = spec.encode(f" {prefix} {numbers[0]}.")
            at = len(bos) + round((n - len(bos) - len(sentence)) * depth / 100)
            doc[at : at + len(sentence)] = sentence
            needles.append((depth, at, prefix, numbers))
        doc = doc[:n]
        unseen_src = ids[n - len(bos) + PROBE :]
        tokens = list(doc)
        breaks = list(range(window, n, window))
        spans: dict[str, tuple[int, int]] = {}
        queries = []

        def turn(body: list[int], name: str) -> None:
            breaks.append(len(tokens))
            tokens.extend(bos + body)
            spans[name] = (len(tokens) - len(body), len(tokens))

        for d in DISTANCES:
            a = n - PROBE - d
            if a >= len(bos) + PROBE or d == 0:
                turn(doc[a : a + PROBE], f"seen_{d}")
        turn(doc[len(bos) : len(bos) + PROBE], f"seen_{n - len(bos) - PROBE}")
        for k in range(UNSEEN):
            turn(unseen_src[k * PROBE : (k + 1) * PROBE], f"unseen_{k}")
        for depth, at, prefix, numbers in needles:
            cands = tuple(_tail(spec.encode, prefix, f" {c}") for c in numbers)
            order = rng.sample(range(N_CHOICES), N_CHOICES)
            cands = tuple(cands[j] for j in order)
            turn(list(spec.encode(prefix)) + list(cands[order.index(0)]), f"needle_{depth}")
            end = len(tokens)
            start = end - len(cands[order.index(0)])
            queries.append(Query(start, end, cands, order.index(0), distance=n - at))
            spans[f"needle_{depth}"] = (start, end)
        return Episode(self.name, "doc", None, n, i, spec.seed, tuple(tokens), tuple(queries), spans, tuple(breaks))

    def score(self, rt: Any, state: Any, ep: Episode, adapt: bool, window: int | None = None) -> LongMemoryScore:
        """Read the document (adapting unless baseline), then score the probes on it and on its control."""
        n = int(ep.ctx_len or 0)
        turn = next((b for b in ep.breaks if b < n), n)
        if adapt:
            rt.read(list(ep.tokens[:n]), state, window=min(turn, window or turn))
        control = random_control(state, ep.seed * 1_000_003 + ep.index)
        probes = _probes(ep, n)
        main = score_episode(rt, state, probes, adapt=False)
        ctrl = score_episode(rt, control, probes, adapt=False)
        return LongMemoryScore(_pad(main.nll, n, np.nan), _pad(main.top1, n, False), main.queries,
                               EpisodeScore(_pad(ctrl.nll, n, np.nan), _pad(ctrl.top1, n, False), ctrl.queries))

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures:
        control = getattr(score, "control", None)
        metrics: dict[str, float] = {}
        curves: dict[str, dict[str, float]] = {"seen_nll_by_distance": {}, "control_seen_nll_by_distance": {}}
        groups: dict[str, list[str]] = {"seen": [], "unseen": [], "needle": []}
        for name in ep.spans:
            groups[name.split("_")[0]].append(name)
        for group, names in groups.items():
            nll = [span_mean(score.nll, ep.spans[k]) for k in names]
            metrics[f"{group}_nll"] = float(np.nanmean(nll))
            if control is not None:
                ctrl = [span_mean(control.nll, ep.spans[k]) for k in names]
                metrics[f"{group}_vs_control"] = float(np.nanmean(ctrl)) - metrics[f"{group}_nll"]
        for name in groups["seen"]:
            label = name.split("_")[1]
            curves["seen_nll_by_distance"][label] = span_mean(score.nll, ep.spans[name])
            if control is not None:
                curves["control_seen_nll_by_distance"][label] = span_mean(control.nll, ep.spans[name])
        correct = [s.correct for s in score.queries if s.correct is not None]
        if correct:
            metrics["needle_acc"] = float(np.mean(correct))
        return Measures(metrics, curves)


def _probes(ep: Episode, n: int) -> Episode:
    """The probe turns of ``ep`` alone (positions shifted by the document's ``n`` tokens; a turn starts at 0)."""
    spans = {k: (a - n, b - n) for k, (a, b) in ep.spans.items()}
    queries = tuple(Query(q.start - n, q.end - n, q.candidates, q.gold, q.distance) for q in ep.queries)
    breaks = tuple(b - n for b in ep.breaks if b >= n)
    return Episode(ep.task, ep.variant, ep.shots, ep.ctx_len, ep.index, ep.seed, ep.tokens[n:], queries, spans,
                   breaks)


def _pad(values: np.ndarray, n: int, fill: Any) -> np.ndarray:
    return np.concatenate([np.full(n, fill, dtype=values.dtype), values])
