"""Streaming generation for one row: sample, yield, feed back; the fast weights write as chunks complete."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adapt_runtime.sampling import sample
from adapt_runtime.state import FastWeights

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime


def generate(rt: Runtime, input_ids: Tensor | Sequence[int], state: FastWeights, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_ids: Sequence[int] = (), adapt: bool = True) -> Iterator[int]:
    """Feed ``input_ids`` (may be empty when the state already has ``last_logits``), then yield up to
    ``max_new_tokens`` sampled ids. Each yielded id is fed back before the next is sampled, except the last one,
    which the caller feeds with its next input (as HF ``generate`` leaves it). Stops after a stop id (yielded) or
    when the context is full."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=rt.device).manual_seed(int(seed))
    stops = {int(t) for t in stop_ids}

    def stream() -> Iterator[int]:
        if ids.numel():
            logits = rt.forward(ids, state, adapt=adapt, logits="last")[0, -1]
        elif state.last_logits is not None:
            logits = state.last_logits
        else:
            raise ValueError("generate needs input_ids, or a state that has already read something")
        for step in range(max_new_tokens):
            token = int(sample(logits[None], temperature, top_p, top_k, generator)[0])
            yield token
            if token in stops or step == max_new_tokens - 1 or state.kv_len + 1 > rt.max_length:
                return
            logits = rt.forward([token], state, adapt=adapt, logits="last")[0, -1]

    return stream()
