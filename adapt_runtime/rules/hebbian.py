"""The Hebbian rule: a three-factor outer-product write ``v_t x_t^T`` with no backward pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from adapt_runtime.architectures import get_path
from adapt_runtime.chunk import Chunk
from adapt_runtime.rules.base import Rule, RuleDefaults, Write, key_scale
from adapt_runtime.rules.steps import Steps, with_defaults

if TYPE_CHECKING:
    from adapt_runtime.architectures import ArchSpec
    from adapt_runtime.config import RuntimeConfig

TARGETS = ("error", "next_token", "output")
MODULATIONS = ("none", "surprise")


class HebbianRule(Rule):
    """``S <- decay * S + lr / (n * mean||x||^2) * sum_t m_t v_t x_t^T`` (see ``key_scale``).

    Targets ``v_t``: ``error`` is the next-token prediction error carried into the residual stream through the
    unembedding U, ``U^T (onehot(x_{t+1}) - softmax(logits_t))`` (the ``U^T p`` term over the top-k of p, which is
    peaked); ``next_token`` is ``U[x_{t+1}]`` alone (In-Place TTT's Theorem-1 target); ``output`` is the layer's own
    output (Ba et al.'s reconstruction). Modulation ``m_t``: ``surprise`` scales by the token's NLL under the
    current model relative to the chunk mean; ``none`` is 1. With ``norm_jacobian``, the unembedding-space targets
    are scaled by the diagonal of the final norm's Jacobian, the path the error takes back to the residual stream:
    per channel by the norm's gain, per token by ``1 / rms`` of the residual (each normalised to mean 1).
    """

    name = "hebbian"
    default_lr = 4.0
    default_chunk_size = 32
    # long streams (benchmarks/long_memory_sweep.py, benchmarks/long_memory_results.md): with all layers and no
    # bound, ||S|| grows past ||W0|| and after 20k tokens unseen text scores +150% vs fresh. The top 3 layers with
    # the delta rule at erase 0.2 (a write first takes back a fifth of what S retrieves at its keys) stay below fresh
    # with no norm bound, and remember 2-4x more than the earlier bound of 0.05 ||W0||
    default_layers = "last:3"
    default_norm_bound = None
    default_steps = {"write_form": "delta", "erase": 0.2}
    # the earlier defaults (plain writes under the bound), kept by rank-r states (no delta form there) and by the
    # targets the sweep did not cover (``output`` and ``next_token``, which stay layer-local): ``defaults_for``
    rank_defaults = {"write_form": "plain", "norm_bound": 0.05}

    @classmethod
    def defaults_for(cls, options: Mapping[str, Any], state_rank: int | None = None) -> RuleDefaults:
        """The ``error`` target on a dense state: the delta form at erase 0.2 and no norm bound (``default_steps``,
        ``default_norm_bound``); a rank-r state and the other targets: plain writes under the 0.05 bound
        (``rank_defaults``)."""
        if options.get("target", "error") == "error":
            return super().defaults_for(options, state_rank)
        steps = {k: v for k, v in cls.rank_defaults.items() if k != "norm_bound"}
        return RuleDefaults(steps, cls.rank_defaults["norm_bound"])

    def __init__(self, target: str = "error", modulation: str = "none", topk: int = 32,
                 norm_jacobian: bool = True, **steps: Any) -> None:
        """``steps``: the step options every rule takes (``adapt_runtime.rules.steps.Steps``), over the rule's
        defaults for ``target`` (``defaults_for``)."""
        self.steps = Steps(**with_defaults(self.defaults_for({"target": target}).steps, steps))
        if target not in TARGETS:
            raise ValueError(f"hebbian target must be one of {TARGETS}, got {target!r}")
        if modulation not in MODULATIONS:
            raise ValueError(f"hebbian modulation must be one of {MODULATIONS}, got {modulation!r}")
        if topk < 0:
            raise ValueError(f"topk must be >= 0 (0 = exact), got {topk}")
        self.target, self.modulation, self.topk = target, modulation, int(topk)
        self.norm_jacobian = bool(norm_jacobian)
        self.reads_final_norm = self.norm_jacobian and target != "output"
        self.capture = frozenset({"x", "y"} if target == "output" else {"x"})
        self._unembed: Tensor | None = None

    @property
    def layer_local(self) -> bool:  # type: ignore[override]
        """``output``, or ``next_token`` without the final norm's scale, unmodulated, on one plastic layer (the rate's
        key scale is shared by all plastic layers): a layer's write reads its own records and the labels only."""
        steps = getattr(self, "steps", None)
        return (self.target != "error" and not self.reads_final_norm and self.modulation == "none"
                and len(getattr(self, "_layers", ())) == 1 and (steps is None or steps.plain))

    @property
    def targets_read_logits(self) -> bool:
        """Only the ``error`` target and the ``surprise`` modulation read the logits (hebbian always stashes)."""
        return self.target == "error" or self.modulation != "none"

    def _bound_unembed(self) -> Tensor:
        """The unembedding of the model the rule was bound to (``bind``)."""
        if self._unembed is None:
            raise RuntimeError("the hebbian rule is not bound to a model (ar.patch binds it)")
        return self._unembed

    def label_targets(self, labels: Tensor) -> dict[str, Tensor]:
        """Unmodulated, ``write`` reads the surprise ``nll`` for its length only; ``next_token``'s target is the
        label's embedding (scaled by the final norm's gain where it reads it), as ``targets`` gives it."""
        nll = torch.zeros(labels.shape[0], device=labels.device)
        if self.target == "output":
            return {"nll": nll}
        v = self._bound_unembed()[labels].float()
        return {"v": v if self._gain is None else v * self._gain, "nll": nll}

    def options(self) -> dict[str, Any]:
        return {"target": self.target, "modulation": self.modulation, "topk": self.topk,
                "norm_jacobian": self.norm_jacobian, **self.steps.options()}

    def bind(self, model: nn.Module, arch: ArchSpec, config: RuntimeConfig) -> None:
        self.steps.check_layers(config.layers, config.state_rank)
        self._unembed = model.get_output_embeddings().weight.detach()
        self._layers = tuple(config.layers)
        self._gain = None
        norm = get_path(model, arch.final_norm)
        weight = getattr(norm, "weight", None)
        if self.reads_final_norm and weight is not None:
            gain = weight.detach().float()
            if type(norm).__name__.startswith("Gemma"):
                gain = 1.0 + gain  # Gemma's RMSNorm scales by (1 + weight)
            self._gain = gain / gain.abs().mean().clamp_min(1e-12)

    def targets(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Surprise ``nll`` `[n]` and (but for ``output``) the shared target ``v`` `[n, d]` of labelled positions."""
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)  # [n]
        nll = lse - logits.gather(-1, labels[:, None]).squeeze(-1)
        if self.target == "output":
            return {"nll": nll}
        U = self._bound_unembed()
        v = U[labels].float()
        if self.target == "error":
            if 0 < self.topk < logits.shape[-1]:
                top_l, top_i = logits.topk(self.topk, dim=-1, sorted=False)  # top-k of p = top-k of logits
                top_p = (top_l - lse[:, None]).exp()
                v = v - torch.einsum("nk,nkd->nd", top_p, U[top_i].float())
            else:
                v = v - (logits - lse[:, None]).exp() @ U.float()
        if self._gain is not None:
            v = v * self._gain
        return {"v": v, "nll": nll}

    def write(self, chunk: Chunk) -> list[Write]:
        nll = chunk.targets.get("nll")
        if nll is None or not len(nll):
            return []
        n_ok = nll.shape[0]  # the positions labelled while their logits were at hand (all, unless a state lost them)
        m = nll / nll.mean().clamp_min(1e-6) if self.modulation == "surprise" else torch.ones_like(nll)
        shared = chunk.targets.get("v")
        if shared is not None and chunk.final_scale is not None:
            scale = chunk.final_scale[:n_ok]
            shared = shared * (scale / scale.mean().clamp_min(1e-12))[:, None]
        keys = {layer: chunk.x[layer][:n_ok] for layer in chunk.layers}
        beta = m * (chunk.lr / key_scale(list(keys.values())))
        steps = None if self.steps.plain else self.steps
        return [Write(layer, chunk.y[layer][:n_ok] if self.target == "output" else shared, X, beta, steps)
                for layer, X in keys.items()]
