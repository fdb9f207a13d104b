"""``PendingChunk``: what a state has captured of its current, incomplete chunk."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PendingChunk:
    """Rows captured for the chunk being read; cleared when the chunk's write fires.

    Attributes:
        chunk: index of the chunk these rows belong to (-1 when empty).
        positions: absolute stream positions of the captured rows.
        layers: per plastic layer and capture name (``x``, ``y``, ``h``), the rows as a list of `[n, *]` pieces.
        targets: per-position shared targets ``v`` `[n, d]` and rates ``beta`` `[n]` computed so far (rules
            whose target needs only the next token fill these as labels arrive).
    """

    chunk: int = -1
    positions: list[int] = field(default_factory=list)
    layers: dict[str, dict[int, list[Tensor]]] = field(default_factory=dict)
    targets: dict[str, list[Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.positions)

    def clear(self) -> None:
        self.chunk = -1
        self.positions.clear()
        self.layers.clear()
        self.targets.clear()

    def add_rows(self, name: str, layer: int, rows: Tensor) -> None:
        self.layers.setdefault(name, {}).setdefault(layer, []).append(rows)

    def add_target(self, name: str, rows: Tensor) -> None:
        self.targets.setdefault(name, []).append(rows)

    def rows(self, name: str, layer: int) -> Tensor:
        pieces = self.layers[name][layer]
        if len(pieces) > 1:
            pieces[:] = [torch.cat(pieces)]
        return pieces[0]

    def target(self, name: str) -> Tensor | None:
        pieces = self.targets.get(name)
        if not pieces:
            return None
        if len(pieces) > 1:
            pieces[:] = [torch.cat(pieces)]
        return pieces[0]

    def target_len(self, name: str) -> int:
        return sum(p.shape[0] for p in self.targets.get(name, []))

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor map for state files."""
        out: dict[str, Tensor] = {}
        for name, per_layer in self.layers.items():
            for layer in per_layer:
                out[f"pending.{name}.{layer}"] = self.rows(name, layer)
        for name in self.targets:
            value = self.target(name)
            if value is not None:
                out[f"pending.target.{name}"] = value
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key, value in tensors.items():
            parts = key.split(".")
            if parts[:2] == ["pending", "target"]:
                self.targets[parts[2]] = [value]
            elif parts[0] == "pending":
                self.layers.setdefault(parts[1], {})[int(parts[2])] = [value]

    def clone(self) -> PendingChunk:
        copy = PendingChunk(chunk=self.chunk, positions=list(self.positions))
        for name, per_layer in self.layers.items():
            for layer in per_layer:
                copy.add_rows(name, layer, self.rows(name, layer).clone())
        for name in self.targets:
            value = self.target(name)
            if value is not None:
                copy.add_target(name, value.clone())
        return copy

    @property
    def nbytes(self) -> int:
        total = sum(p.numel() * p.element_size() for d in self.layers.values() for ps in d.values() for p in ps)
        return total + sum(p.numel() * p.element_size() for ps in self.targets.values() for p in ps)
