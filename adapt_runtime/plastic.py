"""``PlasticDown``: the wrapper that makes a down projection plastic, ``y = W0 x + S x``.

The wrapper holds the original module as ``.base`` and reads, per call, a ``Binding`` set by the runtime: which
fast weights to apply (none, one merged weight, or one S per batch row), and what to record for the rule. With no
binding it is exactly the base module. Everything a rule reads is recorded into the bindings' ``records``: the
wrapper records its input and output, and ``Tap`` pre-hooks (set by ``patch``) record the MLP's hidden input and
the final norm's scale into the binding of their layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapt_runtime import kernels, lowrank
from adapt_runtime.chunk import RETRIEVED

if TYPE_CHECKING:
    from adapt_runtime.one_pass import OnePass

@dataclass
class Binding:
    """What one plastic layer does during one model call (set by the runtime, cleared after).

    Attributes:
        merged: `[d, f]` ``W0 + S`` for a single row (one matmul per token), or None.
        per_row: `[B, d, f]` one S per row (rows without a write hold zeros), or `[N, d, f]` slot storage with
            ``slots`` naming each row's slot; or None.
        slots: `[B]` the slot of each row in ``per_row``, or None (row b reads ``per_row[b]``).
        capture: names to record: ``x`` (input `[B, T, f]`), ``y`` (output `[B, T, d]`), ``h`` (the MLP's
            hidden input `[B, T, d]`), ``inv_rms`` (``chunk.FINAL_SCALE``, the final norm's scale `[B, T]`),
            ``sx`` (``RETRIEVED``: ``S x`` `[B, T, d]`, recorded on the per-row path only).
        grad_probe: add a zero tensor that requires grad to the output, so that ``dL/dy`` can be taken.
    """

    merged: Tensor | None = None
    per_row: Tensor | None = None
    slots: Tensor | None = None
    capture: frozenset[str] = frozenset()
    grad_probe: bool = False
    rows: int = 1  # batch rows of the call (OPT feeds its MLP flattened to [B * T, f])
    factors: list[tuple[Tensor, Tensor] | None] | None = None  # state_rank: each row's (B, A), S = B @ A
    factor_slabs: tuple[Tensor, Tensor] | None = None  # state_rank in the slot pool: (B, A) slabs, rows by ``slots``
    records: dict[str, Tensor] = field(default_factory=dict)
    one_pass: OnePass | None = None  # a one-pass span: the layer applies and writes its chunks (``one_pass``)


class PlasticDown(nn.Module):
    """A plastic down projection. ``base`` is the original ``nn.Linear`` or GPT-2 ``Conv1D``, never modified."""

    def __init__(self, base: nn.Module, index: int, conv1d: bool) -> None:
        super().__init__()
        self.base = base
        self.index = index
        self.conv1d = conv1d
        self.binding: Binding | None = None

    @property
    def weight0(self) -> Tensor:
        """``W0`` as `[d, f]` (GPT-2's Conv1D stores it transposed)."""
        return self.base.weight.T if self.conv1d else self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        b = self.binding
        if b is None:
            return self.base(x)
        flat_shape = x.shape if x.dim() == 2 else None
        if flat_shape is not None:
            x = x.view(b.rows, -1, x.shape[-1])
        if b.merged is not None:
            y = F.linear(x, b.merged.to(x.dtype), self.bias)
        else:
            # a one-pass span takes the static product too: it may fold W0 into its own products
            y = self.base(x) if b.one_pass is None else b.one_pass.layer(self.index, x, self, b.records)
            if b.per_row is not None:
                rows, steps = x.shape[0], x.shape[1]
                slots = b.slots if b.slots is not None else torch.arange(rows, device=x.device)
                offsets = None if steps == 1 else torch.arange(rows + 1, device=x.device) * steps
                if RETRIEVED in b.capture:  # S x apart: the delta form's retrieval, read again at the write
                    sx = y.new_zeros(rows * steps, y.shape[-1])
                    kernels.apply(sx, x.reshape(rows * steps, -1), b.per_row, slots, offsets)
                    b.records[RETRIEVED] = sx.view_as(y).detach()
                    y = y + sx.view_as(y)
                else:
                    flat_y = y.reshape(rows * steps, -1).clone()
                    kernels.apply(flat_y, x.reshape(rows * steps, -1), b.per_row, slots, offsets)
                    y = flat_y.view_as(y)
            if b.factors is not None:
                y = lowrank.apply_rows(y, x, b.factors)
            if b.factor_slabs is not None:
                y = lowrank.apply_slots(y, x, *b.factor_slabs, b.slots)
        if "x" in b.capture:
            b.records["x"] = x.detach()
        if b.grad_probe:
            probe = torch.zeros_like(y, requires_grad=True)
            b.records["probe"] = probe
            y = y + probe
        if "y" in b.capture:
            b.records["y"] = y.detach()
        return y if flat_shape is None else y.reshape(flat_shape[0], -1)

    def extra_repr(self) -> str:
        return f"layer={self.index}, conv1d={self.conv1d}"


def hidden(module: nn.Module, h: Tensor, rows: int) -> Tensor:
    """The MLP's hidden input as `[B, T, d]` (OPT feeds it flattened)."""
    return h.view(rows, -1, h.shape[-1]) if h.dim() == 2 else h


def final_scale(module: nn.Module, r: Tensor, rows: int) -> Tensor:
    """`[B, T]` inverse RMS (LayerNorm: inverse std) of the residual entering the final norm."""
    r = r.float()
    if isinstance(module, nn.LayerNorm):
        r = r - r.mean(-1, keepdim=True)
    return torch.rsqrt(r.pow(2).mean(-1) + 1e-6).reshape(rows, -1)


class Tap:
    """A forward pre-hook that records ``read(module, input, rows)`` under ``name`` into ``wrapper``'s binding
    when the binding captures ``name`` (nothing otherwise)."""

    def __init__(self, wrapper: PlasticDown, name: str, read: Callable[[nn.Module, Tensor, int], Tensor]) -> None:
        self.wrapper, self.name, self.read = wrapper, name, read

    def __call__(self, module: nn.Module, args: tuple) -> None:
        binding = self.wrapper.binding
        if binding is not None and self.name in binding.capture:
            binding.records[self.name] = self.read(module, args[0].detach(), binding.rows)
