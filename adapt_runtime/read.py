"""``read``: a document of any length into a state's fast weights, one context window at a time.

The document is cut into windows no longer than the model's context. Before each window the KV cache is dropped,
so each window is read in a fresh context (positions restart at 0), while the fast weights go on learning across
windows: the stream, the pending chunk and S carry over, chunks stay absolute (ARCHITECTURE §3). Windows end on
absolute chunk boundaries where they can, so a chunk is never split between two contexts (the gradient rule then
differentiates a chunk's own forward). The last window's KV stays in the state.

    result = rt.read(ids, state, window=448, progress=True)
    result.windows, result.writes, result.window_nll
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adapt_runtime.state import FastWeights

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime

DEFAULT_MAX_WINDOW = 2048  # a default window is the model's context, up to this (logits of a window are [T, V])


@dataclass(frozen=True)
class ReadResult:
    """What a read did.

    Attributes:
        tokens: tokens read.
        windows: context windows they were read in.
        writes, refused_writes: fast-weight writes fired (and refused as non-finite) during the read.
        seconds: wall time of the read.
        window_nll: per window, the mean next-token NLL of its tokens given the window's earlier tokens (how
            surprising the document was); NaN for a window of one token.
    """

    tokens: int
    windows: int
    writes: int
    refused_writes: int
    seconds: float
    window_nll: tuple[float, ...]

    @property
    def mean_nll(self) -> float:
        """Mean of the windows' NLLs (windows without a score left out)."""
        scored = [x for x in self.window_nll if not math.isnan(x)]
        return sum(scored) / len(scored) if scored else math.nan

    def to_dict(self) -> dict:
        nll = [None if math.isnan(x) else round(x, 6) for x in self.window_nll]
        return {"tokens": self.tokens, "windows": self.windows, "writes": self.writes,
                "refused_writes": self.refused_writes, "seconds": round(self.seconds, 6), "window_nll": nll}


def default_window(rt: Runtime) -> int:
    return min(rt.max_length, DEFAULT_MAX_WINDOW)


def check_window(rt: Runtime, window: int | None) -> int:
    """``window`` (or the default), checked against the model's context."""
    if window is None:
        return default_window(rt)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")
    if window > rt.max_length:
        raise ValueError(f"window {window} is longer than the model's context of {rt.max_length} tokens")
    return window


def window_spans(start: int, total: int, window: int, chunk_size: int) -> list[tuple[int, int]]:
    """Spans ``[a, b)`` of a ``total``-token document read into a stream that already holds ``start`` tokens.

    Each span is at most ``window`` long; each but the last ends on an absolute chunk boundary of the stream
    (``(start + b) % chunk_size == 0``) whenever the window holds one.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    spans = []
    a = 0
    while a < total:
        b = min(a + window, total)
        if b < total:
            aligned = b - (start + b) % chunk_size
            if aligned > a:
                b = aligned
        spans.append((a, b))
        a = b
    return spans


def token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """`[T-1]` NLL of ``ids[1:]`` under ``logits[:-1]`` (logits `[T, V]`, ids `[T]`)."""
    if ids.numel() < 2:
        return torch.empty(0)
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -lp.gather(-1, ids[1:, None].to(lp.device))[:, 0]


def mean_or_nan(values: Sequence[float] | Tensor) -> float:
    values = values.tolist() if isinstance(values, Tensor) else list(values)
    return sum(values) / len(values) if values else math.nan


def read(rt: Runtime, ids: Tensor | Sequence[int], state: FastWeights, window: int | None = None,
         progress: bool = False, on_window: Callable[[int, int, float], None] | None = None) -> ReadResult:
    """Read ``ids`` (`[T]`, any length) into ``state`` in windows of at most ``window`` tokens.

    Args:
        rt: the runtime.
        ids: the document's token ids.
        state: the state that learns; its KV is dropped before every window (see the module docstring).
        window: tokens per context window (default: the model's context, up to 2048).
        progress: show a tqdm progress bar (tokens).
        on_window: called after each window with (windows done, tokens done, the window's mean NLL).
    """
    W = check_window(rt, window)
    tokens = torch.as_tensor(ids, dtype=torch.long, device=rt.device).reshape(-1)
    spans = window_spans(state.tokens_seen, tokens.numel(), W, rt.config.chunk_size)
    writes, refused = state.writes, state.refused_writes
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens.numel(), unit="tok", desc="read")
    nll: list[float] = []
    try:
        for k, (a, b) in enumerate(spans):
            piece = tokens[a:b]
            state.drop_kv()
            logits = rt.forward(piece, state)[0]
            nll.append(mean_or_nan(token_nll(logits, piece)))
            if bar is not None:
                bar.update(b - a)
                bar.set_postfix(nll=f"{nll[-1]:.3f}", writes=state.writes - writes)
            if on_window is not None:
                on_window(k + 1, b, nll[-1])
    finally:
        if bar is not None:
            bar.close()
    return ReadResult(tokens.numel(), len(spans), state.writes - writes, state.refused_writes - refused,
                      time.perf_counter() - started, tuple(nll))
