"""A KV cache layer that appends in place: keys and values live in preallocated buffers with spare positions.

transformers' ``DynamicLayer.update`` concatenates the whole cache with the new positions on every call, so a
decode step copies every cached key and value. Here (as in gpt-fast's ``KVCache`` and transformers' ``StaticLayer``)
a layer's keys/values are held in buffers ``[B, H, capacity, D]``; ``update`` writes the new positions into the
spare part and returns views of the filled part, which are also its ``keys``/``values``, so every method transformers
calls on a ``DynamicLayer`` (``get_seq_length``, ``get_mask_sizes``, ...) sees an ordinary cache of the filled
length. Only when the spare positions run out is everything copied into a larger buffer (amortised growth).

Positions of a buffer are written once: ``KVBuffer.filled`` only grows, and a write goes only to positions at or past
it, which no view has ever shown. Views handed out earlier (a row's ``kv``) therefore never change under their holder.
A row's view is registered with the buffer, its row and its span (``RowSpan``), so that the next call over the same
rows can find it and append in place; a view that is not registered (a slice of it, a clone, a loaded file) is copied
into a fresh buffer instead, which is always correct.

Memory bound: a buffer allocated for ``n`` positions has ``spare(n) = min(max(n // 2, SPARE_MIN), SPARE_MAX)`` extra
positions (64 <= spare <= 512 by default): at most ``max(n + 64, min(1.5 n, n + 512))`` positions per row in all. A
row's views keep the whole buffer of their call alive (all its rows and its spare positions), as a row's views of the
padded batch tensor kept that tensor alive before; the spare part is the only extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary
from transformers.cache_utils import DynamicLayer

SPARE_MIN = 64  # positions
SPARE_MAX = 512  # positions


def capacity_for(needed: int) -> int:
    """Positions of a new buffer that must hold ``needed`` positions (see the module docstring for the bound)."""
    return needed + min(max(needed // 2, SPARE_MIN), SPARE_MAX)


class KVBuffer:
    """One layer's keys and values for ``rows`` rows, ``[rows, H, capacity, D]``, of which ``filled`` positions are
    written (the rest are zeros)."""

    __slots__ = ("keys", "values", "filled")

    def __init__(self, like_keys: Tensor, like_values: Tensor, rows: int, capacity: int) -> None:
        self.keys = like_keys.new_zeros(rows, like_keys.shape[1], capacity, like_keys.shape[3])
        self.values = like_values.new_zeros(rows, like_values.shape[1], capacity, like_values.shape[3])
        self.filled = 0

    @property
    def rows(self) -> int:
        return int(self.keys.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])

    def writable(self) -> bool:
        """False when the buffer is an inference tensor and inference mode is off (an in-place write would fail)."""
        return not self.keys.is_inference() or torch.is_inference_mode_enabled()


@dataclass(frozen=True)
class RowSpan:
    """Where a row's keys view lies: row ``row`` of ``buffer``, positions ``start:end``; ``values`` is the row's
    values view handed out with it (a pair only continues in place when both are the views handed out)."""

    buffer: KVBuffer
    row: int
    start: int
    end: int
    values: Tensor


_SPANS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # a row's keys view -> its RowSpan, while the view lives


def span_of(keys: Tensor, values: Tensor) -> RowSpan | None:
    """The registered span of a row's ``(keys, values)`` pair, or None (not a view this module handed out)."""
    span = _SPANS.get(keys)
    return span if span is not None and span.values is values else None


class AppendLayer(DynamicLayer):
    """A ``DynamicLayer`` whose cache is rows ``r0:r1``, positions ``start:end`` of a ``KVBuffer``, appended in place.

    Built with ``over(buffer, r0, r1, start)`` (the cache is the buffer's part up to ``buffer.filled``) or
    ``holding(keys, values)`` (a cache of tensors that are not in a buffer: copied into one on the first update).
    Under autograd (new keys that require grad) it concatenates like ``DynamicLayer``, so no graph goes through a
    buffer that later calls write into.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.buffer: KVBuffer | None = None
        self.r0 = self.r1 = self.start = self.end = 0
        self._exposed: Tensor | None = None  # the keys view last set: another value means someone replaced it

    @classmethod
    def over(cls, buffer: KVBuffer, r0: int, r1: int, start: int) -> AppendLayer:
        layer = cls()
        layer.buffer, layer.r0, layer.r1, layer.start, layer.end = buffer, r0, r1, start, buffer.filled
        layer._expose()
        layer._init_from(layer.keys)
        return layer

    @classmethod
    def holding(cls, keys: Tensor, values: Tensor) -> AppendLayer:
        layer = cls()
        layer.keys, layer.values = keys, values
        layer._init_from(keys)
        return layer

    def _init_from(self, keys: Tensor) -> None:
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor | None = None) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_empty(0)
        self.values = key_states.new_empty(0) if value_states is None else value_states.new_empty(0)
        self.is_initialized = True

    def _expose(self) -> None:
        buf = self._held()
        self.keys = buf.keys[self.r0 : self.r1, :, self.start : self.end]
        self.values = buf.values[self.r0 : self.r1, :, self.start : self.end]
        self._exposed = self.keys

    def _held(self) -> KVBuffer:
        """The buffer this layer's entries live in (set by ``_regrow`` before any append)."""
        if self.buffer is None:
            raise RuntimeError("the layer holds no KV buffer")
        return self.buffer

    def _appendable(self, key_states: Tensor, value_states: Tensor, steps: int) -> bool:
        buf = self.buffer
        return (buf is not None and self.keys is self._exposed and buf.filled == self.end
                and self.end + steps <= buf.capacity and buf.writable()
                and key_states.dtype == buf.keys.dtype and value_states.dtype == buf.values.dtype
                and key_states.device == buf.keys.device)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        steps = int(key_states.shape[-2])
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            past = self.keys is not None and self.keys.dim() == 4
            self.keys = torch.cat([self.keys, key_states], dim=-2) if past else key_states
            self.values = torch.cat([self.values, value_states], dim=-2) if past else value_states
            self.buffer = None
            return self.keys, self.values
        if not self._appendable(key_states, value_states, steps):
            self._regrow(key_states, value_states, steps)
        buf, end = self._held(), self.end
        buf.keys[self.r0 : self.r1, :, end : end + steps] = key_states
        buf.values[self.r0 : self.r1, :, end : end + steps] = value_states
        self.end = buf.filled = end + steps
        self._expose()
        return self.keys, self.values

    def _regrow(self, key_states: Tensor, value_states: Tensor, steps: int) -> None:
        """Copy the cache into a new buffer with room for ``steps`` more positions and spare ones."""
        past = self.keys is not None and self.keys.dim() == 4 and self.keys.shape[-2] > 0
        n = int(self.keys.shape[-2]) if past else 0
        buf = KVBuffer(key_states, value_states, int(key_states.shape[0]), capacity_for(n + steps))
        if past:
            buf.keys[:, :, :n] = self.keys
            buf.values[:, :, :n] = self.values
        buf.filled = n
        self.buffer, self.r0, self.r1, self.start, self.end = buf, 0, buf.rows, 0, n

    def row_views(self, drops: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Each row's ``(keys, values)`` `[1, H, L, D]` after the call, without its first ``drops[b]`` positions
        (the padding), detached; views of the buffer are registered so that the next call can continue them."""
        out = []
        for b, drop in enumerate(drops):
            if self.buffer is None or self.keys is not self._exposed:
                out.append((self.keys[b : b + 1, :, drop:].detach(), self.values[b : b + 1, :, drop:].detach()))
                continue
            row, start = self.r0 + b, self.start + drop
            keys = self.buffer.keys[row : row + 1, :, start : self.end]
            values = self.buffer.values[row : row + 1, :, start : self.end]
            _SPANS[keys] = RowSpan(self.buffer, row, start, self.end, values)
            out.append((keys, values))
        return out
