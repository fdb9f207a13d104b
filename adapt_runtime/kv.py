"""Per-row KV caches in, one batched HF cache out, and back: rows at different lengths are left-padded.

Every layer keeps its whole KV, sliding-window layers included: the model's mask applies the window, so a row's
layers all have its ``kv_len`` entries, rows past the window batch like any others, and a chunk recomputed on a KV
prefix sees exactly the keys it saw the first time (a cache trimmed to the window could not give them back).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adapt_runtime.state import FastWeights

# transformers < 5 initialises a layer from its keys alone
_LAZY_INIT_TAKES_VALUES = len(inspect.signature(DynamicLayer.lazy_initialization).parameters) > 2


@dataclass
class BatchedCache:
    """A cache for one model call over B rows, with the mask and positions that the padding needs."""

    cache: DynamicCache
    attention_mask: Tensor | None  # [B, Lmax + T] or None when no row is padded
    position_ids: Tensor  # [B, T]
    lengths: list[int]
    width: int  # Lmax
    rows: list[FastWeights] = field(default_factory=list)
    row_kv: list[list] = field(default_factory=list)  # each row's kv list as ``scatter`` left it

    def continues(self, states: list[FastWeights], width: int) -> bool:
        """True when ``states`` are this call's rows, in order, with their caches untouched since: the padded
        tensors of this call can then serve the next one as they are (decode steps of a fixed batch)."""
        return (len(states) > 1 and len(states) == len(self.rows)
                and all(s is r and s.kv is kv for s, r, kv in zip(states, self.rows, self.row_kv))
                and int(self.cache.layers[0].keys.shape[-2]) == width)


def assemble(states: list[FastWeights], steps: int, device: torch.device,
             previous: BatchedCache | None = None) -> BatchedCache:
    """Stack the rows' caches for a call of ``steps`` new tokens per row (reusing ``previous`` when it continues)."""
    lengths = [s.kv_len for s in states]
    width = max(lengths)
    cache = DynamicCache()  # full layers only (see the module docstring)
    if width and previous is not None and previous.continues(states, width):
        for layer in previous.cache.layers:
            _load_layer(cache, layer.keys, layer.values)
    elif width and len(states) == 1:
        _check_rows(states, lengths)
        for k, v in states[0].kv:
            _load_layer(cache, k, v)
    elif width:
        _check_rows(states, lengths)
        ref = next(s.kv for s in states if s.kv)
        for i, (ref_k, ref_v) in enumerate(ref):
            keys = ref_k.new_zeros(len(states), ref_k.shape[1], width, ref_k.shape[3])
            values = ref_v.new_zeros(len(states), ref_v.shape[1], width, ref_v.shape[3])
            for b, (s, n) in enumerate(zip(states, lengths)):
                if n:  # left-padded: the row's entries end at the common width
                    keys[b, :, width - n :] = s.kv[i][0][0]
                    values[b, :, width - n :] = s.kv[i][1][0]
            _load_layer(cache, keys, values)
    offsets = torch.tensor(lengths, device=device)[:, None]
    position_ids = offsets + torch.arange(steps, device=device)[None]
    mask = None
    if any(n != width for n in lengths):
        mask = torch.ones(len(states), width + steps, dtype=torch.long, device=device)
        for b, n in enumerate(lengths):
            mask[b, : width - n] = 0
    return BatchedCache(cache, mask, position_ids, lengths, width)


def _check_rows(states: list[FastWeights], lengths: list[int]) -> None:
    """A clear error unless every layer of every row holds the row's ``kv_len`` positions."""
    for s, n in zip(states, lengths):
        if n and any(int(k.shape[-2]) != n or int(v.shape[-2]) != n for k, v in s.kv):
            raise ValueError(f"a row's KV layers do not all hold its {n} cached positions (a cache trimmed to a "
                             "sliding window?); call state.drop_kv() to continue with the fast weights alone")


def _load_layer(cache: DynamicCache, keys: Tensor, values: Tensor) -> None:
    """Append a layer holding ``keys``/``values`` as they are (``update`` would copy them once more)."""
    layer = DynamicLayer()
    layer.lazy_initialization(*((keys, values) if _LAZY_INIT_TAKES_VALUES else (keys,)))
    layer.keys, layer.values = keys, values
    cache.layers.append(layer)


def scatter(batched: BatchedCache, states: list[FastWeights]) -> None:
    """Give each row its part of the cache after the call (padding stripped, graph detached)."""
    layers = batched.cache.layers
    for b, (s, n) in enumerate(zip(states, batched.lengths)):
        drop = batched.width - n
        s.kv = [(layer.keys[b : b + 1, :, drop:].detach(), layer.values[b : b + 1, :, drop:].detach())
                for layer in layers]
    batched.rows, batched.row_kv = list(states), [s.kv for s in states]
