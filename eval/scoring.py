"""Teacher-forced, strictly causal scoring of one episode under a patched runtime.

The stream is fed to a fresh state in pieces that end at turn breaks, attention-window edges and query
starts. Each piece's logits give the NLL of the tokens that follow, so the score at position p depends on
tokens[:p + 1] only (the runtime's own causality; the harness never feeds a token before it is scored).
Multiple-choice candidates are scored on forks (`state.clone()`) of the state at the query, so they never
enter the main stream; the main stream then continues with the gold answer, as a reader would see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from adapt_runtime.eval.episode import Episode


@dataclass
class QueryScore:
    """Summed log-probability of each candidate, and whether the gold one strictly beat all others."""

    logprobs: list[float]
    correct: bool | None


@dataclass
class EpisodeScore:
    """nll[p], top1[p]: loss and greedy hit for tokens[p]; NaN where p is not predicted (0 and turn starts)."""

    nll: np.ndarray
    top1: np.ndarray
    queries: list[QueryScore]


def _feed(rt: Any, state: Any, ids: Sequence[int], adapt: bool, window: int | None) -> torch.Tensor:
    """Feed ids and return their logits [n, V] (float32); with `window`, drop the attention cache
    whenever it holds `window` tokens (block-local attention: memory beyond a block lives in S only)."""
    out = []
    i = 0
    while i < len(ids):
        n = len(ids) - i
        if window is not None:
            if state.kv_len >= window:
                state.drop_kv()
            n = min(n, window - state.kv_len)
        logits = rt.forward(list(ids[i : i + n]), state, adapt=adapt)
        out.append(logits[0].detach().float())
        i += n
    return torch.cat(out) if out else torch.empty(0)


def _score_candidates(rt: Any, state: Any, last: torch.Tensor, cands: tuple[tuple[int, ...], ...],
                      adapt: bool, window: int | None) -> list[float]:
    first = torch.log_softmax(last, -1)
    scores = []
    for cand in cands:
        lp = float(first[cand[0]])
        if len(cand) > 1:
            fork = state.clone()
            logp = torch.log_softmax(_feed(rt, fork, cand[:-1], adapt, window), -1)
            lp += float(logp[torch.arange(len(cand) - 1), torch.tensor(cand[1:])].sum())
        scores.append(lp)
    return scores


def score_episode(rt: Any, state: Any, ep: Episode, adapt: bool, window: int | None = None,
                  frozen_turns: bool = False) -> EpisodeScore:
    """Score `ep` on a fresh `state`. adapt=False applies S but never writes (the `none` baseline).

    `frozen_turns` scores as `adapt-serve --engine vllm` generates: every turn after the first (each break starts
    one) is scored with S fixed as the turn began (a fork fed without writes), while the state itself reads the
    turn with writes, as the engine's learning pass after a completion does."""
    if frozen_turns and adapt:
        return _score_frozen_turns(rt, state, ep, window)
    tokens = list(ep.tokens)
    n = len(tokens)
    nll = np.full(n, np.nan)
    top1: np.ndarray = np.zeros(n, dtype=bool)
    mc = {q.start: q for q in ep.queries if len(q.candidates) > 1}
    cuts = sorted({0, n, *ep.breaks, *mc})
    breaks = set(ep.breaks)
    query_scores: dict[int, QueryScore] = {}
    last: torch.Tensor | None = None
    for a, b in zip(cuts, cuts[1:]):
        if a in breaks:
            state.drop_kv()
            last = None
        if a in mc and last is not None:
            q = mc[a]
            lps = _score_candidates(rt, state, last, q.candidates, adapt, window)
            others = [lp for i, lp in enumerate(lps) if i != q.gold]
            query_scores[a] = QueryScore(lps, bool(lps[q.gold] > max(others)))
        logits = _feed(rt, state, tokens[a:b], adapt, window)
        logp = torch.log_softmax(logits, -1)
        if last is not None:
            first = torch.log_softmax(last, -1)
            nll[a] = -float(first[tokens[a]])
            top1[a] = int(first.argmax()) == tokens[a]
        m = b - a - 1
        if m > 0:
            tgt = torch.tensor(tokens[a + 1 : b])
            rows = logp[:m]
            nll[a + 1 : b] = (-rows[torch.arange(m), tgt]).double().numpy()
            top1[a + 1 : b] = (rows.argmax(-1) == tgt).numpy()
        last = logits[-1]
    queries = [query_scores.get(q.start, QueryScore([], None)) for q in ep.queries]
    return EpisodeScore(nll, top1, queries)


def _score_frozen_turns(rt: Any, state: Any, ep: Episode, window: int | None) -> EpisodeScore:
    """``score_episode`` with every turn after the first scored on a fork of the state as the turn began."""
    if any(len(q.candidates) > 1 for q in ep.queries):
        raise ValueError(f"{ep.task}: frozen turns score teacher-forced text only (no multiple-choice queries)")
    tokens = list(ep.tokens)
    n = len(tokens)
    nll = np.full(n, np.nan)
    top1: np.ndarray = np.zeros(n, dtype=bool)
    cuts = sorted({0, n, *ep.breaks})
    for a, b in zip(cuts, cuts[1:]):
        if a in ep.breaks:
            state.drop_kv()
        scorer = state.clone() if a > 0 else state  # the first turn is a prompt: read and scored with writes
        logits = _feed(rt, scorer, tokens[a:b], a == 0, window)
        if a > 0:
            _feed(rt, state, tokens[a:b], True, window)  # the learning pass over the turn
        m = b - a - 1
        if m > 0:
            tgt = torch.tensor(tokens[a + 1 : b])
            rows = torch.log_softmax(logits, -1)[:m]
            nll[a + 1 : b] = (-rows[torch.arange(m), tgt]).double().numpy()
            top1[a + 1 : b] = (rows.argmax(-1) == tgt).numpy()
    return EpisodeScore(nll, top1, [QueryScore([], None) for _ in ep.queries])
