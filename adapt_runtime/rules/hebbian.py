"""The Hebbian rule: a three-factor outer-product write ``v_t x_t^T`` with no backward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adapt_runtime.architectures import get_path
from adapt_runtime.rules.base import Rule, Segment, Write, key_scale
from adapt_runtime.state import FastWeights

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime

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
    # long streams (benchmarks/long_memory_sweep.py): with all layers and no bound, ||S|| grows past ||W0|| and
    # after 20k tokens unseen text scores +150% vs fresh; the top 3 layers held at 0.05 ||W0|| stay below fresh
    default_layers = "last:3"
    default_norm_bound = 0.05

    def __init__(self, target: str = "error", modulation: str = "none", topk: int = 32,
                 norm_jacobian: bool = True) -> None:
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

    def options(self) -> dict[str, Any]:
        return {"target": self.target, "modulation": self.modulation, "topk": self.topk,
                "norm_jacobian": self.norm_jacobian}

    def bind(self, rt: Runtime) -> None:
        self._unembed = rt.model.get_output_embeddings().weight.detach()
        self._gain = None
        norm = get_path(rt.model, rt.arch.final_norm)
        weight = getattr(norm, "weight", None)
        if self.reads_final_norm and weight is not None:
            gain = weight.detach().float()
            if type(norm).__name__.startswith("Gemma"):
                gain = 1.0 + gain  # Gemma's RMSNorm scales by (1 + weight)
            self._gain = gain / gain.abs().mean().clamp_min(1e-12)

    def _targets(self, logits: Tensor, labels: Tensor) -> tuple[Tensor | None, Tensor]:
        """Shared targets `[n, d]` (None for ``output``) and surprise `[n]` of positions with known labels."""
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)  # [n]
        nll = lse - logits.gather(-1, labels[:, None]).squeeze(-1)
        if self.target == "output":
            return None, nll
        U = self._unembed
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
        return v, nll

    def observe(self, rt: Runtime, state: FastWeights, segment: Segment) -> None:
        self.observe_rows(rt, [state], [segment])

    def observe_rows(self, rt: Runtime, states: list[FastWeights], segments: list[Segment]) -> None:
        """Targets of every row's labelled positions in one batched step (known labels are a prefix of a row)."""
        counts = [int((seg.labels >= 0).sum()) for seg in segments]
        for state, segment in zip(states, segments):
            self.observe_scale(state, segment)
        if not sum(counts):
            return
        logits = torch.cat([seg.logits[:n] for seg, n in zip(segments, counts)])
        labels = torch.cat([seg.labels[:n] for seg, n in zip(segments, counts)])
        v, nll = self._targets(logits, labels)
        start = 0
        for state, n in zip(states, counts):
            if n:
                if v is not None:
                    state.pending.add_target("v", v[start : start + n])
                state.pending.add_target("nll", nll[start : start + n])
            start += n

    def observe_scale(self, state: FastWeights, segment: Segment) -> None:
        if self.reads_final_norm and segment.final_inv_rms is not None:
            state.pending.add_target("inv_rms", segment.final_inv_rms)

    def resolve(self, rt: Runtime, state: FastWeights, next_token: int) -> None:
        self.resolve_rows(rt, [state], [next_token])

    def resolve_rows(self, rt: Runtime, states: list[FastWeights], next_tokens: list[int]) -> None:
        """Targets of each row's last fed position, now labelled by ``next_tokens``, in one batched step."""
        rows = [(s, t) for s, t in zip(states, next_tokens)
                if len(s.pending) - s.pending.target_len("nll") == 1
                and s.pending.positions[-1] == s.tokens_seen - 1 and s.last_logits is not None]
        if not rows:
            return
        logits = torch.stack([s.last_logits for s, _ in rows])
        labels = torch.tensor([t for _, t in rows], device=logits.device)
        v, nll = self._targets(logits, labels)
        for i, (s, _) in enumerate(rows):
            if v is not None:
                s.pending.add_target("v", v[i : i + 1])
            s.pending.add_target("nll", nll[i : i + 1])

    def writes_for(self, rt: Runtime, state: FastWeights, next_token: int, graph: Any = None) -> list[Write]:
        pending = state.pending
        self.resolve(rt, state, next_token)
        n_ok = pending.target_len("nll")
        if n_ok == 0:
            return []
        nll = pending.target("nll")
        m = nll / nll.mean().clamp_min(1e-6) if self.modulation == "surprise" else torch.ones_like(nll)
        shared = pending.target("v")
        inv_rms = pending.target("inv_rms")
        if shared is not None and inv_rms is not None:
            scale = inv_rms[:n_ok]
            shared = shared * (scale / scale.mean().clamp_min(1e-12))[:, None]
        keys = {layer: pending.rows("x", layer)[:n_ok] for layer in state.spec.layers}
        beta = m * (rt.config.lr / key_scale(list(keys.values())))
        writes = []
        for layer, X in keys.items():
            V = pending.rows("y", layer)[:n_ok] if self.target == "output" else shared
            writes.append(Write(layer, V, X, beta))
        return writes

