"""Per-row sampling: OpenAI penalties on top of the runtime's shared sampler (``ar.sample``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

import adapt_runtime as ar


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler. ``top_k`` 0 (or -1) means no cut; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        return gen


def penalised(logits: torch.Tensor, generated: list[int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over the tokens this row generated. ``logits`` [V]."""
    if not generated or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return logits
    counts = Counter(generated)
    ids = torch.tensor(list(counts), dtype=torch.long)
    freq = torch.tensor([counts[i] for i in counts], dtype=logits.dtype)
    out = logits.clone()
    out[ids] -= params.frequency_penalty * freq + params.presence_penalty
    return out


def sample_token(
    logits: torch.Tensor, generated: list[int], params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One token id from ``logits`` [V] under ``params``."""
    scores = penalised(logits.float(), generated, params)
    top_k = max(params.top_k, 0)
    token = ar.sample(scores[None], params.temperature, params.top_p, top_k, generator)
    return int(token[0])


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, logprob) pairs of ``logprobs`` [V], best first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
    return [(int(i), float(v)) for i, v in zip(ids, values)]
