"""Per-row KV caches in, one batched HF cache out, and back: rows at different lengths are left-padded.

Every layer keeps its whole KV, sliding-window layers included: the model's mask applies the window, so a row's
layers all have its ``kv_len`` entries, rows past the window batch like any others, and a chunk recomputed on a KV
prefix sees exactly the keys it saw the first time (a cache trimmed to the window could not give them back).

The cache's layers are ``AppendLayer``s (``adapt_runtime.kv_buffer``): keys and values live in buffers with spare
positions and a call writes only its new positions. A row's ``kv`` after a call is a view of its row of the buffer,
registered with it; when the next call's rows are consecutive rows of one buffer, in order, each ending where the
buffer is filled (decode steps of a fixed batch, or of one row), the call continues that buffer in place. Any other
set of rows is copied into a new buffer, left-padded, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from adapt_runtime.kv_buffer import AppendLayer, KVBuffer, capacity_for, span_of
from adapt_runtime.state import FastWeights


@dataclass
class BatchedCache:
    """A cache for one model call over B rows, with the mask and positions that the padding needs."""

    cache: DynamicCache
    attention_mask: Tensor | None  # [B, Lmax + T] or None when no row is padded
    position_ids: Tensor  # [B, T]
    lengths: list[int]
    width: int  # Lmax


def assemble(states: list[FastWeights], steps: int, device: torch.device) -> BatchedCache:
    """Stack the rows' caches for a call of ``steps`` new tokens per row (the rows' own views say whether they
    continue a buffer in place)."""
    lengths = [s.kv_len for s in states]
    width = max(lengths)
    cache = DynamicCache()  # full layers only (see the module docstring)
    cache.layer_class_to_replicate = AppendLayer  # layers made lazily (rows without KV) append in place too
    if width:
        _check_rows(states, lengths)
        ref = next(s.kv for s in states if s.kv)
        cache.layers.extend(_layer(states, lengths, width, steps, i) for i in range(len(ref)))
    offsets = torch.tensor(lengths, device=device)[:, None]
    position_ids = offsets + torch.arange(steps, device=device)[None]
    mask = None
    if any(n != width for n in lengths):
        mask = torch.ones(len(states), width + steps, dtype=torch.long, device=device)
        for b, n in enumerate(lengths):
            mask[b, : width - n] = 0
    return BatchedCache(cache, mask, position_ids, lengths, width)


def _layer(states: list[FastWeights], lengths: list[int], width: int, steps: int, i: int) -> AppendLayer:
    """Layer ``i`` of the call: the rows' buffer continued in place when they are its consecutive rows, each ending
    where it is filled; otherwise a copy (one row: copied on its first update, or concatenated under autograd)."""
    spans = [span_of(*_kv(s)[i]) if n else None for s, n in zip(states, lengths)]
    first = spans[0]
    if first is not None and all(
        sp is not None and sp.buffer is first.buffer and sp.row == first.row + b and sp.end == first.buffer.filled
        for b, sp in enumerate(spans)
    ):
        return AppendLayer.over(first.buffer, first.row, first.row + len(states), first.buffer.filled - width)
    if len(states) == 1:
        return AppendLayer.holding(*_kv(states[0])[i])
    ref_k, ref_v = next(_kv(s)[i] for s in states if s.kv)
    buffer = KVBuffer(ref_k, ref_v, len(states), capacity_for(width + steps))
    for b, (s, n) in enumerate(zip(states, lengths)):
        if n:  # left-padded: the row's entries end at the common width
            buffer.keys[b, :, width - n : width] = _kv(s)[i][0][0]
            buffer.values[b, :, width - n : width] = _kv(s)[i][1][0]
    buffer.filled = width
    return AppendLayer.over(buffer, 0, len(states), 0)


def _kv(state: FastWeights) -> list[tuple[Tensor, Tensor]]:
    """The state's cache, which a row with cached positions has."""
    if state.kv is None:
        raise ValueError("the state holds no KV cache")
    return state.kv


def _check_rows(states: list[FastWeights], lengths: list[int]) -> None:
    """A clear error unless every layer of every row holds the row's ``kv_len`` positions."""
    for s, n in zip(states, lengths):
        if n and any(int(k.shape[-2]) != n or int(v.shape[-2]) != n for k, v in _kv(s)):
            raise ValueError(f"a row's KV layers do not all hold its {n} cached positions (a cache trimmed to a "
                             "sliding window?); call state.drop_kv() to continue with the fast weights alone")


def scatter(batched: BatchedCache, states: list[FastWeights]) -> None:
    """Give each row its part of the cache after the call (padding stripped, graph detached): views of the buffer,
    never longer than the row's cached positions."""
    drops = [batched.width - n for n in batched.lengths]
    per_layer = [layer.row_views(drops) if isinstance(layer, AppendLayer)
                 else [(layer.keys[b : b + 1, :, d:].detach(), layer.values[b : b + 1, :, d:].detach())
                       for b, d in enumerate(drops)]
                 for layer in batched.cache.layers]
    for b, s in enumerate(states):
        s.kv = [views[b] for views in per_layer]
