"""``RuntimeConfig``: the frozen configuration of a patched model, and the layer selector."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def select_layers(spec: str | int | list[int] | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Resolve a layer selector to sorted distinct indices.

    ``all``; ``last:N`` (the top N); ``every:K`` (0, K, 2K, ...); a comma list or a list of indices, negatives
    counting from the top (``-1`` is the last layer).
    """
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return tuple(range(num_layers))
        head, _, arg = text.partition(":")
        if head in ("last", "every"):
            if not arg.isdigit() or int(arg) < 1:
                raise ValueError(f"layers {spec!r}: '{head}:N' needs a positive integer N")
            n = int(arg)
            picked = range(max(0, num_layers - n), num_layers) if head == "last" else range(0, num_layers, n)
            return tuple(picked)
        try:
            spec = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"layers {spec!r} is not 'all', 'last:N', 'every:K' or a list of indices"
            ) from None
    indices = []
    for i in spec:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ValueError(f"layer index {i} out of range for a model with {num_layers} layers")
        indices.append(j)
    if not indices:
        raise ValueError("layers selects no layer")
    return tuple(sorted(set(indices)))


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model is patched and how its fast weights learn.

    Attributes:
        rule: rule name (``none``, ``hebbian``, ``gradient``, ``inplace-ttt``).
        chunk_size: tokens per chunk C; the write of chunk i applies from chunk i+1 on.
        layers: the plastic layer indices (resolved from the selector).
        lr: the rule's normalised learning rate.
        decay: factor on S before each write (1.0 keeps everything).
        clip: bound on each write's Frobenius norm relative to ``||W0||_F`` (None: no clip).
        norm_bound: bound on each layer's ``||S||_F`` relative to its ``||W0||_F``: a write that takes S past it
            is kept and S rescaled onto the bound (None: no bound). Keeps long sessions from drifting.
        state_dtype: dtype of S (``float32`` default; deltas of 1e-6 vanish in bf16).
        options: rule-specific options (for example ``target`` and ``modulation`` of ``hebbian``).
        state_rank: hold each layer's S as rank-r factors ``B [d, r] A [r, f]`` (see ``adapt_runtime.lowrank``);
            None (the default) keeps S dense.
    """

    rule: str
    chunk_size: int
    layers: tuple[int, ...]
    lr: float
    decay: float = 1.0
    clip: float | None = None
    state_dtype: str = "float32"
    norm_bound: float | None = None
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    state_rank: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"clip must be positive or None, got {self.clip}")
        if self.norm_bound is not None and not self.norm_bound > 0:
            raise ValueError(f"norm_bound must be positive or None, got {self.norm_bound}")
        if self.lr < 0 or self.lr != self.lr:
            raise ValueError(f"lr must be a non-negative number, got {self.lr}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {sorted(STATE_DTYPES)}, got {self.state_dtype!r}")
        if self.state_rank is not None and (self.state_rank < 1 or self.state_dtype != "float32"):
            raise ValueError(f"state_rank must be a positive integer with state_dtype float32, got "
                             f"{self.state_rank} with {self.state_dtype}")

    @property
    def torch_state_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        if self.state_rank is None:  # dense configs serialise exactly as before the option existed
            del data["state_rank"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
