"""The ``learned`` rule: the plasticity rule that ``adapt-train`` learned, run by the runtime.

It reads ``plasticity.json`` (the rule's form, target, modulation, chunk size and layers) and
``plasticity.safetensors`` (the learned per-layer rate and decay, per-connection ``alpha``, gate) from a checkpoint
folder, by default the model's own (``ar.load_model(DIR)`` then ``ar.patch(model, rule="learned")``, or
``adapt-serve --model DIR --rule learned``). Its write is ``adapt_runtime.train.update.chunk_updates``, the function
the training forward differentiates, so the runtime's state equals the training forward's. The chunk size and the
layers default to the trained ones; ``lr`` (default 1) multiplies the learned rates. A write with ``alpha`` is
dense (``U = alpha . (V^T diag(beta) X)``, handed to the write op as ``I^T U``); the delta form reads ``S_i x_t``
as the layer's output less ``W0 x_t + b``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapt_runtime.architectures import get_path
from adapt_runtime.chunk import Chunk
from adapt_runtime.rules.base import Rule, Write
from adapt_runtime.train.config import PlasticityConfig
from adapt_runtime.train.params import RuleParams
from adapt_runtime.train.update import ChunkInputs, chunk_updates, position_targets

if TYPE_CHECKING:
    from adapt_runtime.architectures import ArchSpec
    from adapt_runtime.config import RuntimeConfig

log = logging.getLogger("adapt_runtime")


class LearnedRule(Rule):
    """A trained rule from ``checkpoint`` (an ``adapt-train`` folder), or from ``params`` given directly."""

    name = "learned"
    reads_checkpoint = True  # patch() passes the model's folder when no checkpoint is given
    default_lr = 1.0
    default_decay = 1.0  # the learned decay comes with each write

    def __init__(self, checkpoint: str | Path | None = None, params: RuleParams | None = None) -> None:
        if checkpoint is not None:
            params = RuleParams.load(checkpoint)
        if params is None:
            raise ValueError(
                "the learned rule reads a checkpoint folder written by adapt-train (plasticity.json and "
                "plasticity.safetensors): load the model from it, or pass checkpoint=DIR"
            )
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.params = params
        self.plasticity: PlasticityConfig = params.config
        c = self.plasticity
        if c.form == "gradient" and c.inner != "next_token":
            raise ValueError(f"learned: the runtime computes the next-token inner loss only, not {c.inner!r}")
        self.default_chunk_size = c.chunk_size  # type: ignore[misc]  # per instance: the checkpoint decides
        self.default_layers = c.layers  # type: ignore[misc]  # per instance: the checkpoint decides
        self.needs_grad = c.form == "gradient"  # type: ignore[misc]  # per instance: the checkpoint decides
        capture = {"x"}
        if c.form == "delta" or (c.form == "hebbian" and c.target == "output"):
            capture.add("y")
        if c.modulation == "gate":
            capture.add("h")
        self.capture = frozenset(capture)
        self._down: dict[int, tuple[Tensor, Tensor | None]] = {}

    def options(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, **self.plasticity.to_dict()}

    def bind(self, model: nn.Module, arch: ArchSpec, config: RuntimeConfig) -> None:
        trained = self.plasticity.layers
        if tuple(config.layers) != trained:
            raise ValueError(f"learned: the rule was trained on layers {list(trained)}, not {list(config.layers)}")
        if config.chunk_size != self.plasticity.chunk_size:
            log.warning(
                "learned: chunk_size %d differs from the trained %d; the writes are not those of training",
                config.chunk_size,
                self.plasticity.chunk_size,
            )
        decoder = get_path(model, arch.layers)
        for i in trained:
            down = get_path(decoder[i], arch.down)
            w0 = down.weight0 if hasattr(down, "weight0") else (down.weight.T if arch.conv1d else down.weight)
            alpha = self.params.connection(i)
            if alpha is not None and tuple(alpha.shape) != tuple(w0.shape):
                raise ValueError(f"learned: alpha of layer {i} is {tuple(alpha.shape)}, W0 is {tuple(w0.shape)}")
            self._down[i] = (w0.detach(), None if down.bias is None else down.bias.detach())
        self._unembed = model.get_output_embeddings().weight.detach()
        self.params = self.params.to(device=self._unembed.device, dtype=torch.float32).requires_grad_(False)

    def targets(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        if not self.plasticity.needs_targets:
            return {}
        with torch.no_grad():
            return position_targets(self.plasticity, self._unembed.float(), logits.float(), labels)

    def write(self, chunk: Chunk) -> list[Write]:
        c = self.plasticity
        n = len(chunk)
        if c.needs_targets:
            n = min([n] + [t.shape[0] for t in chunk.targets.values()])  # positions labelled with logits at hand
        if n == 0:
            return []
        row = lambda t: t[:n][None].float()  # noqa: E731
        inputs = ChunkInputs(
            x={i: row(chunk.x[i]) for i in chunk.layers},
            h={i: row(chunk.h[i]) for i in chunk.h},
            y={i: row(chunk.y[i]) for i in chunk.y},
            grads={i: row(chunk.grads[i]) for i in chunk.grads},
            targets={k: row(v) for k, v in chunk.targets.items()},
        )
        if c.form == "delta":
            inputs.retrieved = {i: inputs.y[i] - self._base(i, inputs.x[i]) for i in chunk.layers}
        with torch.no_grad():
            updates = chunk_updates(self.params, inputs, lr=chunk.lr)
        writes = []
        for i, u in updates.items():
            decay = float(u.decay[0])
            if u.alpha is None:
                writes.append(Write(i, u.V[0], u.X[0], u.beta[0], decay=decay))
            else:  # dense: V^T diag(1) X with V = I_d, X = U
                U = u.dense()[0]
                eye = torch.eye(U.shape[0], device=U.device, dtype=U.dtype)
                writes.append(Write(i, eye, U, torch.ones(U.shape[0], device=U.device), decay=decay))
        return writes

    def _base(self, layer: int, x: Tensor) -> Tensor:
        """``W0 x + b`` of ``layer`` for keys `[1, n, f]`."""
        w0, bias = self._down[layer]
        return F.linear(x, w0.float(), None if bias is None else bias.float())
