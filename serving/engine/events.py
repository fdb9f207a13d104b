"""What the scheduler thread reports to a request, in order: prompt scores, tokens, finishes, done or error."""

from __future__ import annotations

from dataclasses import dataclass

TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class PromptScored:
    """A prompt was read. ``logprobs`` holds one (logprob, top) per prompt token (None for the first) if echo
    scoring was asked for, else None."""

    prompt_index: int
    prompt_tokens: int
    logprobs: list[tuple[float, TopLogprobs] | None] | None


@dataclass(frozen=True)
class Token:
    """Row ``index`` produced ``token_id``; ``text`` is the newly safe text (may be empty)."""

    index: int
    token_id: int
    text: str
    logprob: float
    top: TopLogprobs


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str  # "stop" | "length"
    completion_tokens: int


@dataclass(frozen=True)
class Done:
    """Every row of the job finished; the job's states may now be committed."""


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = PromptScored | Token | Finished | Done | Failed
