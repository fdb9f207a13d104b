"""Per-row sampling: OpenAI penalties on top of the runtime's shared sampler (``ar.sample``).

Every value the API accepts is safe here: a temperature below ``MIN_TEMPERATURE`` is greedy (dividing logits by
1e-40 overflows to inf and NaN), and a top-p below ``MIN_TOP_P`` is raised to it, so the nucleus always keeps the
most likely token (1e-300 rounds to 0 in float32 and would keep none). Generators and index tensors live on the
logits' device.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

import adapt_runtime as ar

MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6


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

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device`` (the logits' device), or None without a seed."""
        if self.seed is None:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        return gen


def safe_settings(temperature: float, top_p: float) -> tuple[float, float]:
    """(temperature, top_p) as the sampler should use them: tiny temperatures greedy, top-p at least MIN_TOP_P."""
    return (0.0 if temperature < MIN_TEMPERATURE else temperature), min(max(top_p, MIN_TOP_P), 1.0)


def draw(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] through ``ar.sample``, for any accepted setting."""
    temperature, top_p = safe_settings(temperature, top_p)
    return ar.sample(logits, temperature, top_p, max(top_k, 0), generator)


def penalised(logits: torch.Tensor, generated: list[int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over the tokens this row generated. ``logits`` [V]."""
    if not generated or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return logits
    counts = Counter(generated)
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    freq = torch.tensor([counts[i] for i in counts], dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[ids] -= params.frequency_penalty * freq + params.presence_penalty
    return out


def sample_token(
    logits: torch.Tensor, generated: list[int], params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One token id from ``logits`` [V] under ``params``."""
    scores = penalised(logits.float(), generated, params)
    token = draw(scores[None], params.temperature, params.top_p, params.top_k, generator)
    return int(token[0])


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, logprob) pairs of ``logprobs`` [V], best first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
    return [(int(i), float(v)) for i, v in zip(ids, values)]
