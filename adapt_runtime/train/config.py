"""``PlasticityConfig``: the frozen description of a learned plasticity rule (what ``adapt-train`` learns and the
``learned`` rule runs), saved beside a checkpoint as ``plasticity.json``.

The rule, per plastic layer ``l`` and finished chunk ``i`` of ``n`` positions (keys ``x_t``, the down projection's
inputs; ``K = n * mean ||x||^2`` over the chunk's keys in all plastic layers, as the runtime's built-in rules):

    S_{i+1} = lambda_i S_i + U_i,      U_i = alpha_l . sum_t beta_t v_t x_t^T,      beta_t = lr * rate_l * m_t / K

``v_t`` by ``form``: ``hebbian`` the post-synaptic target (``target``: the layer's output ``y_t``, the prediction
error ``U^T(onehot - p_t)``, or the next token's embedding); ``delta`` that target less what S retrieves,
``v_t - S_i x_t``; ``gradient`` ``-dL/dy_t`` of the chunk's summed next-token loss (Duan et al.'s ``create_graph``
form when trained). ``m_t`` by ``modulation``: 1, the token's surprise (NLL over the chunk's mean NLL), or a learned
gate ``eta_t = eta_max * sigmoid(w_l . h_t + b_l)`` of the MLP input ``h_t``, which also sets the forgetting as in
Chaudhary (2025), ``W <- (1 - eta) W + eta alpha . Delta``: ``lambda_i = decay_l * (1 - mean_t eta_t)``; without the
gate ``lambda_i = decay_l``. ``rate_l = softplus(.) > 0`` and ``decay_l = sigmoid(.) in (0, 1)`` are learned per
layer, ``alpha_l`` `[d, f]` (per-connection coefficients) when ``alpha`` is set.

``norm`` sets the divisor: ``key`` is ``K`` above; ``delta`` is Chaudhary (2025)'s clip, per position
``m_t <- m_t * min(1, 1 / ||Delta_t||)`` with ``||Delta_t||^2 = sum_l ||v_lt||^2 ||x_lt||^2`` (the outer products of all
plastic layers together) and no ``K``; with the gate the clipped ``m_t`` also sets the forgetting, so that with
``chunk_size`` 1, ``init_decay`` 1 (fixed) and the gate this is their ``W <- (1 - eta) W + eta alpha . Delta``,
``eta = eta_max sigmoid(.) min(1, 1/||Delta||)``. ``inner`` is the gradient form's loss: ``next_token`` (the chunk's
summed next-token cross-entropy) or ``internal``, a learned loss of the outputs alone, ``sum_t mean((P z_t)^2)`` with
``z_t`` the logits and ``P`` `[V, V]` learned (init identity; Chaudhary's internal loss, which needs no labels).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

FORMS = ("hebbian", "delta", "gradient")
TARGETS = ("output", "error", "next_token")
MODULATIONS = ("none", "surprise", "gate")
NORMS = ("key", "delta")
INNERS = ("next_token", "internal")
CONFIG_FILE = "plasticity.json"
PARAMS_FILE = "plasticity.safetensors"


@dataclass(frozen=True)
class PlasticityConfig:
    """A learned rule's structure and initial values (the learned values live in ``RuleParams``).

    Attributes:
        form: ``hebbian``, ``delta`` or ``gradient`` (see the module docstring).
        target: ``v_t`` of ``hebbian`` and ``delta``: ``output``, ``error`` or ``next_token`` (unused by gradient).
        modulation: ``none``, ``surprise`` or ``gate`` (learned neuromodulation, coupled to the forgetting).
        alpha: learn per-connection coefficients ``alpha_l`` `[d, f]` (init 1).
        eta_max: the gate's ceiling (Chaudhary: 0.2).
        chunk_size: tokens per chunk C (the runtime must use the same).
        layers: the plastic layers, resolved indices.
        init_rate: ``rate_l`` at initialisation.
        init_decay: ``decay_l`` at initialisation; with ``learn_decay`` False it stays there (1.0 allowed).
        learn_decay: learn ``decay_l`` (in (0, 1)) or keep ``init_decay``.
        norm: the rate's divisor, ``key`` or ``delta`` (see the module docstring).
        inner: the gradient form's inner loss, ``next_token`` or ``internal``.
    """

    form: str = "hebbian"
    target: str = "error"
    modulation: str = "none"
    alpha: bool = False
    eta_max: float = 0.2
    chunk_size: int = 32
    layers: tuple[int, ...] = (0,)
    init_rate: float = 1.0
    init_decay: float = 0.99
    learn_decay: bool = True
    norm: str = "key"
    inner: str = "next_token"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.inner not in INNERS:
            raise ValueError(f"inner must be one of {INNERS}, got {self.inner!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.layers:
            raise ValueError("layers selects no layer")
        object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        if not self.init_rate > 0:
            raise ValueError(f"init_rate must be positive, got {self.init_rate}")
        low_ok = self.init_decay > 0 if self.learn_decay else self.init_decay >= 0
        high_ok = self.init_decay < 1 if self.learn_decay else self.init_decay <= 1
        if not (low_ok and high_ok):
            span = "(0, 1)" if self.learn_decay else "[0, 1]"
            raise ValueError(f"init_decay must be in {span}, got {self.init_decay}")
        if not 0 < self.eta_max <= 1:
            raise ValueError(f"eta_max must be in (0, 1], got {self.eta_max}")

    @property
    def needs_targets(self) -> bool:
        """Whether a write reads per-position targets computed from the logits (``v`` or the surprise)."""
        return (self.form != "gradient" and self.target != "output") or self.modulation == "surprise"

    @property
    def needs_labels(self) -> bool:
        """Whether a write reads the next tokens (targets, or the gradient form's next-token loss)."""
        return self.needs_targets or (self.form == "gradient" and self.inner == "next_token")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlasticityConfig:
        known = {f.name for f in fields(cls)}
        given: dict[str, Any] = {k: (tuple(v) if k == "layers" else v) for k, v in data.items() if k in known}
        return cls(**given)

    def save(self, folder: str | Path, **extra: Any) -> None:
        """``plasticity.json`` in ``folder`` (``extra`` keys, e.g. the training step, beside the config)."""
        text = json.dumps({**self.to_dict(), **extra}, indent=2, sort_keys=True)
        (Path(folder) / CONFIG_FILE).write_text(text + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> PlasticityConfig:
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"{folder} holds no {CONFIG_FILE}: not a checkpoint written by adapt-train")
        return cls.from_dict(json.loads(path.read_text()))
