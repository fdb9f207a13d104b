"""In-Place TTT's trained rule: ``V = conv5(T) @ P`` within the chunk, ``dW = ttt_lr * V^T X``.

Reads the trained ``ttt_conv`` (depthwise, kernel 5, per layer) and ``ttt_proj`` weights and the ``ttt_layers``,
``ttt_chunk``, ``ttt_lr`` and ``ttt_target`` config keys from an In-Place TTT checkpoint folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from adapt_runtime.chunk import Chunk
from adapt_runtime.rules.base import Rule, Write

if TYPE_CHECKING:
    from adapt_runtime.architectures import ArchSpec
    from adapt_runtime.config import RuntimeConfig

_KEY = re.compile(r"layers\.(\d+)\.mlp\.(ttt_conv|ttt_proj)\.weight$")


def chunk_conv(T: Tensor, conv: Tensor) -> Tensor:
    """Depthwise conv of `[n, d]` rows with a `[d, 1, k]` kernel, zero-padded at the chunk's edges."""
    k = conv.shape[-1]
    out = F.conv1d(T.T[None].float(), conv.float(), padding=k // 2, groups=T.shape[1])
    return out[0].T


class InPlaceTTTRule(Rule):
    """The checkpoint's trained target and rate; the runtime's ``lr`` is ``ttt_lr``."""

    name = "inplace-ttt"
    default_lr = 0.3
    layer_local = True  # a layer's targets read its own MLP input (or the tokens' embeddings) and keys only

    def __init__(self, checkpoint: str | Path | None = None, conv: dict[int, Tensor] | None = None,
                 proj: dict[int, Tensor] | None = None, ttt_target: str = "hidden_states",
                 ttt_layers: list[int] | None = None, ttt_chunk: int | None = None, ttt_lr: float | None = None):
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.conv, self.proj = conv or {}, proj or {}
        self.ttt_target, self.ttt_layers, self.ttt_chunk, self.ttt_lr = ttt_target, ttt_layers, ttt_chunk, ttt_lr
        if self.checkpoint is not None:
            self._read_checkpoint(Path(self.checkpoint))
        if self.ttt_target not in ("hidden_states", "input_embed"):
            raise ValueError(f"ttt_target must be 'hidden_states' or 'input_embed', got {self.ttt_target!r}")
        self.capture = frozenset({"x", "h"})

    def _read_checkpoint(self, folder: Path) -> None:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"inplace-ttt needs an In-Place TTT checkpoint folder; {folder} has no config.json")
        config = json.loads(config_path.read_text())
        missing = [k for k in ("ttt_layers", "ttt_chunk", "ttt_lr") if k not in config]
        if missing:
            raise ValueError(f"{folder} is not an In-Place TTT checkpoint: config lacks {', '.join(missing)}")
        self.ttt_layers = [int(i) for i in config["ttt_layers"]]
        self.ttt_chunk, self.ttt_lr = int(config["ttt_chunk"]), float(config["ttt_lr"])
        self.ttt_target = config.get("ttt_target", "hidden_states")
        for file in sorted(folder.glob("*.safetensors")):
            for key, value in load_file(str(file)).items():
                match = _KEY.search(key)
                if match:
                    table = self.conv if match.group(2) == "ttt_conv" else self.proj
                    table[int(match.group(1))] = value

    def options(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "ttt_target": self.ttt_target, "ttt_layers": self.ttt_layers,
                "ttt_chunk": self.ttt_chunk, "ttt_lr": self.ttt_lr}

    def bind(self, model: nn.Module, arch: ArchSpec, config: RuntimeConfig) -> None:
        absent = [i for i in config.layers if i not in self.conv or i not in self.proj]
        if absent:
            raise ValueError(f"inplace-ttt: no ttt_conv/ttt_proj weights for layers {absent}; the checkpoint "
                             f"has them for {sorted(self.conv)}")
        self._embed = model.get_input_embeddings()

    def _source(self, chunk: Chunk, layer: int) -> Tensor:
        return self._embed(chunk.tokens).detach() if self.ttt_target == "input_embed" else chunk.h[layer]

    def write(self, chunk: Chunk) -> list[Write]:
        writes = []
        for layer in chunk.layers:
            T = self._source(chunk, layer)
            proj = self.proj[layer].to(T.device).float()
            V = chunk_conv(T, self.conv[layer].to(T.device)) @ proj
            X = chunk.x[layer]
            writes.append(Write(layer, V, X, torch.full((X.shape[0],), chunk.lr, device=X.device)))
        return writes

    def write_layer(self, chunks: list[Chunk]) -> list[list[Write]]:
        """One layer's chunks of a one-pass span: the conv of all equal-length chunks in one batched call (each
        chunk zero-padded at its own edges, as ``chunk_conv``) and their projection in one matmul."""
        if len({len(c) for c in chunks}) != 1 or len(chunks) == 1:
            return [self.write(chunk) for chunk in chunks]
        layer = chunks[0].layers[0]
        T = torch.stack([self._source(c, layer) for c in chunks]).float()  # [J, n, d]
        conv = self.conv[layer].to(T.device).float()
        k = conv.shape[-1]
        V = F.conv1d(T.transpose(1, 2), conv, padding=k // 2, groups=T.shape[2]).transpose(1, 2)
        V = (V.reshape(-1, V.shape[-1]) @ self.proj[layer].to(T.device).float()).view_as(T)
        return [[Write(layer, V[j], c.x[layer], torch.full((len(c),), c.lr, device=T.device))]
                for j, c in enumerate(chunks)]
