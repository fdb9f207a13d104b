"""``RuleParams``: the learned parameters of a plasticity rule, an ``nn.Module`` trained with the model and read
by the runtime's ``learned`` rule (``plasticity.safetensors`` beside a checkpoint).

Every parameter is unconstrained and mapped into its range: ``rate_l = softplus(rate_raw_l)`` (positive),
``decay_l = sigmoid(decay_raw_l)`` (in (0, 1)), the gate ``eta_max * sigmoid(w_l . h + b_l)``; ``alpha_l`` is used
as is (init 1), and so is the internal loss's ``P`` `[V, V]` (``inner`` ``internal``, init identity). Layers are keyed
by their decoder index (``"3"``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adapt_runtime.train.config import PARAMS_FILE, PlasticityConfig


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class RuleParams(nn.Module):
    """Per-layer learned rate, decay, per-connection ``alpha`` and gate of ``config``.

    Args:
        config: the rule's structure and initial values.
        shapes: per plastic layer its down projection's ``(d, f)``; ``hidden``: per layer the MLP input width
            (the gate's input, ``d`` for every supported architecture).
        vocab: the width ``V`` of the logits, for the internal loss's ``P`` (``inner`` ``internal`` only).
    """

    def __init__(self, config: PlasticityConfig, shapes: dict[int, tuple[int, int]], vocab: int | None = None) -> None:
        super().__init__()
        missing = [i for i in config.layers if i not in shapes]
        if missing:
            raise ValueError(f"no shapes for plastic layers {missing}")
        self.config = config
        self.shapes = {i: tuple(shapes[i]) for i in config.layers}
        n = len(config.layers)
        self.rate_raw = nn.Parameter(torch.full((n,), inverse_softplus(config.init_rate)))
        if config.learn_decay:
            self.decay_raw = nn.Parameter(torch.full((n,), logit(config.init_decay)))
        else:
            self.register_buffer("decay_fixed", torch.full((n,), float(config.init_decay)))
        self.alpha = nn.ParameterDict(
            {str(i): nn.Parameter(torch.ones(self.shapes[i])) for i in config.layers} if config.alpha else {}
        )
        if config.modulation == "gate":
            self.gate_w = nn.ParameterDict(
                {str(i): nn.Parameter(torch.zeros(self.shapes[i][0])) for i in config.layers}
            )
            self.gate_b = nn.Parameter(torch.zeros(n))
        if config.form == "gradient" and config.inner == "internal":
            if vocab is None:
                raise ValueError("the internal inner loss needs the width of the logits: pass vocab")
            self.internal = nn.Parameter(torch.eye(vocab))
        self._index = {layer: k for k, layer in enumerate(config.layers)}

    def rate(self, layer: int) -> Tensor:
        return nn.functional.softplus(self.rate_raw[self._index[layer]])

    def decay(self, layer: int) -> Tensor:
        k = self._index[layer]
        return torch.sigmoid(self.decay_raw[k]) if self.config.learn_decay else self.decay_fixed[k]

    def connection(self, layer: int) -> Tensor | None:
        """``alpha_l`` `[d, f]`, or None when the rule has no per-connection coefficients."""
        return self.alpha[str(layer)] if self.config.alpha else None

    def gate(self, layer: int, h: Tensor) -> Tensor:
        """``eta_max * sigmoid(w_l . h_t + b_l)`` for ``h`` `[..., d]` -> `[...]`."""
        w = self.gate_w[str(layer)]
        score = h.to(w.dtype) @ w + self.gate_b[self._index[layer]]
        return self.config.eta_max * torch.sigmoid(score)

    def internal_loss(self, logits: Tensor) -> Tensor:
        """Chaudhary's internal loss of the logits `[..., V]`: ``sum_t mean_k (P z_t)_k^2`` (a scalar)."""
        z = logits.to(self.internal.dtype) @ self.internal.T
        return z.pow(2).mean(-1).sum()

    def summary(self) -> dict[str, list[float]]:
        """The mapped per-layer values (rate, decay), for logs."""
        with torch.no_grad():
            return {
                "rate": [round(float(self.rate(i)), 6) for i in self.config.layers],
                "decay": [round(float(self.decay(i)), 6) for i in self.config.layers],
            }

    def save(self, folder: str | Path) -> None:
        """``plasticity.safetensors`` in ``folder`` (the config goes to ``plasticity.json``: ``config.save``)."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(Path(folder) / PARAMS_FILE), metadata={"format": "adapt-train rule params"})

    @classmethod
    def load(
        cls, folder: str | Path, config: PlasticityConfig | None = None, device: str | torch.device = "cpu"
    ) -> RuleParams:
        """The parameters saved in ``folder`` (shapes from the file; ``config`` from ``plasticity.json`` if None)."""
        config = config or PlasticityConfig.load(folder)
        path = Path(folder) / PARAMS_FILE
        if not path.is_file():
            raise ValueError(f"{folder} holds no {PARAMS_FILE}: not a checkpoint written by adapt-train")
        tensors = load_file(str(path))
        shapes = {}
        for i in config.layers:
            if f"alpha.{i}" in tensors:
                shapes[i] = tuple(tensors[f"alpha.{i}"].shape)
            elif f"gate_w.{i}" in tensors:
                shapes[i] = (tensors[f"gate_w.{i}"].shape[0], 0)
            else:
                shapes[i] = (0, 0)
        vocab = tensors["internal"].shape[0] if "internal" in tensors else None
        params = cls(config, shapes, vocab)
        params.load_state_dict(tensors)
        return params.to(device)
