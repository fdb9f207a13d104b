"""``FastWeightHooks``: the training forward's plastic layers, as hooks on an unmodified HF model.

A forward hook on each plastic layer's down projection adds ``S_b x`` to row b's output (S `[B, d, f]`, with
autograd through S) and records the projection's input ``x`` and output ``y``; a pre-hook on the MLP records its
input ``h``. The model's modules and weights are never replaced, so the model saves and loads as a plain HF
checkpoint. With ``probe``, an output that does not require grad becomes a leaf that does, so that ``dL/dy`` can be
taken (the gradient form) even when nothing upstream is trained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from adapt_runtime.architectures import ArchSpec, get_path


class FastWeightHooks:
    """Hooks on ``model``'s plastic ``layers``; ``S``, ``probe`` and ``capture`` are set per call by the caller.

    Attributes:
        S: per layer `[B, d, f]` (or None: zero), applied as ``y = W0 x + b + S x``.
        records: per layer, after a call, ``x`` `[B, T, f]`, ``y`` `[B, T, d]` and ``h`` `[B, T, d]`.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, layers: tuple[int, ...]) -> None:
        decoder = get_path(model, spec.layers)
        self.layers = layers
        self.S: dict[int, Tensor | None] = {i: None for i in layers}
        self.records: dict[int, dict[str, Tensor]] = {i: {} for i in layers}
        self.rows = 1
        self.probe = False
        self._handles = []
        for i in layers:
            layer = decoder[i]
            self._handles.append(get_path(layer, spec.down).register_forward_hook(self._down_hook(i)))
            self._handles.append(get_path(layer, spec.mlp_in).register_forward_pre_hook(self._mlp_hook(i)))

    def _down_hook(self, i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x, shape = args[0], output.shape
            x = x.reshape(self.rows, -1, x.shape[-1])  # OPT feeds its MLP flattened to [B * T, f]
            y = output.reshape(self.rows, -1, shape[-1])
            S = self.S[i]
            if S is not None:
                y = y + torch.einsum("btf,bdf->btd", x, S.to(x.dtype))
            if self.probe and not y.requires_grad:
                y = y.detach().requires_grad_()
            self.records[i]["x"], self.records[i]["y"] = x, y
            return y.reshape(shape)

        return hook

    def _mlp_hook(self, i: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            h = args[0]
            self.records[i]["h"] = h.reshape(self.rows, -1, h.shape[-1])

        return hook

    def remove(self) -> None:
        """Take the hooks off: the model is the plain model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
