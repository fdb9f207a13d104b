"""Per-row KV caches in, one batched HF cache out, and back: rows at different lengths are left-padded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adapt_runtime.state import FastWeights


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
                and all(type(layer) is DynamicLayer for layer in self.cache.layers)
                and int(self.cache.layers[0].keys.shape[-2]) == width)


def assemble(states: list[FastWeights], config, steps: int, device: torch.device,
             previous: BatchedCache | None = None) -> BatchedCache:
    """Stack the rows' caches for a call of ``steps`` new tokens per row (reusing ``previous`` when it continues)."""
    lengths = [s.kv_len for s in states]
    width = max(lengths)
    cache = DynamicCache(config=config)
    if width and previous is not None and previous.continues(states, width):
        for i, layer in enumerate(previous.cache.layers):
            _load_layer(cache, i, layer.keys, layer.values)
    elif width and len(states) == 1:
        for i, (k, v) in enumerate(states[0].kv):
            _load_layer(cache, i, k, v)
    elif width:
        if any(s.kv and int(s.kv[0][0].shape[-2]) != n for s, n in zip(states, lengths)):
            raise ValueError("rows of different lengths cannot be batched on a model with sliding-window layers; "
                             "feed them one at a time")
        ref = next(s.kv for s in states if s.kv)
        for i, (ref_k, ref_v) in enumerate(ref):
            keys = ref_k.new_zeros(len(states), ref_k.shape[1], width, ref_k.shape[3])
            values = ref_v.new_zeros(len(states), ref_v.shape[1], width, ref_v.shape[3])
            for b, (s, n) in enumerate(zip(states, lengths)):
                if n:  # left-padded: the row's entries end at the common width
                    keys[b, :, width - n :] = s.kv[i][0][0]
                    values[b, :, width - n :] = s.kv[i][1][0]
            _load_layer(cache, i, keys, values)
    offsets = torch.tensor(lengths, device=device)[:, None]
    position_ids = offsets + torch.arange(steps, device=device)[None]
    mask = None
    if any(n != width for n in lengths):
        mask = torch.ones(len(states), width + steps, dtype=torch.long, device=device)
        for b, n in enumerate(lengths):
            mask[b, : width - n] = 0
    return BatchedCache(cache, mask, position_ids, lengths, width)


def _load_layer(cache: DynamicCache, i: int, keys: Tensor, values: Tensor) -> None:
    """Put a row's stored keys/values into layer ``i`` of a fresh cache; a full-attention layer takes the tensors
    as they are (``update`` would copy them once more), a sliding one goes through ``update``."""
    layer = cache.layers[i] if i < len(cache.layers) else None
    if type(layer) is DynamicLayer:
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    else:
        cache.update(keys, values, i)


def scatter(batched: BatchedCache, states: list[FastWeights]) -> None:
    """Give each row its part of the cache after the call (padding stripped, graph detached)."""
    layers = batched.cache.layers
    for b, (s, n) in enumerate(zip(states, batched.lengths)):
        drop = batched.width - n
        s.kv = [(layer.keys[b : b + 1, :, drop:].detach(), layer.values[b : b + 1, :, drop:].detach())
                for layer in layers]
    batched.rows, batched.row_kv = list(states), [s.kv for s in states]
