"""A chunk's write onto its state: from the rule's ``Write`` s of finished chunks to S, every plastic layer or none.

``fire`` is the runtime's step at a chunk boundary (the write of chunk i fires when the first token of chunk i+1 is
fed): the rows whose pending chunk is finished get their ``Chunk`` (``adapt_runtime.chunk``), the rule's writes of
all of them in one ``write_rows`` call, each applied to its state (``apply``), and the pending chunk is cleared.
``apply`` is the one decision of how a chunk's writes land on a state: on a dense S (``apply_dense``) or on rank-r
factors (``apply_factors``), then the norm bound.

The overflow guard. A chunk's write touches each plastic layer once (``kernels.write``, one slot per layer). The
kernel refuses a layer whose write norm is not finite and leaves that layer alone, so a write that overflowed on one
layer only would leave the layers before it written while the state counts the write as refused. So the whole write
is checked before any layer is touched, in float64 where nothing overflows: a bound on every float32 quantity the
kernels form (``beta_t v_t``, ``x_t``, every partial sum of ``V^T diag(beta) X``, its squared norm and the Gram
products of the Triton path) must stay below ``OVERFLOW_GUARD``; otherwise no layer is written (``writes_are_safe``,
the one check of the dense and the low-rank state).

The step options. A rule's step options (``Write.steps``, ``adapt_runtime.rules.steps``) are taken here, before that
check, so a step that comes out non-finite is refused like any other write: per-layer rates scale ``beta``; the
delta form alone is ``kernels.write``'s own (``erase``), and with a normalised or orthogonalised step its targets are
formed first (``V - erase * decay * X S^T``); the orthogonalised step replaces the targets by the Newton-Schulz ones;
the normalised step scales ``beta`` to the step's norm. Where the forward formed ``S x_t`` apart (``Chunk.retrieved``:
a dense state read several tokens at a time), the delta form's retrieval is that record, ``V - erase * decay * R``,
and no product with S is formed at the write (nor bounded: the guard sees the targets themselves). Momentum and two
time scales keep tensors of their own in the state (``FastWeights.extra``): the velocity takes the step through
``kernels.write`` and S takes the velocity; the slow part is folded in after the write (``step_with_extras``).

The norm bound of long sessions: each layer's ``||S||`` held at most ``norm_bound * ||W0||`` by rescaling. A clip
bounds each write; over a long stream the writes still add up, and past some norm the fast weights make unseen text
worse than no adaptation at all (``benchmarks/long_memory_sweep.py``). With ``norm_bound`` set, a write that takes a
layer's S past its bound is kept and S is scaled back onto the bound: the newest write keeps its full weight and
everything older shrinks, a forgetting that acts only when the state is full (``bound_norms``; the low-rank state
rescales the new factors, ``apply_factors``).

The one-pass prefill (``adapt_runtime.one_pass``) writes the chunks a span completes inside each plastic layer with
the same guard, decay, clip and bound; it falls back to this path wherever it could not write them the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adapt_runtime import kernels, lowrank
from adapt_runtime.chunk import Chunk, finished, label_last
from adapt_runtime.kernels.torch_ops import write_norms
from adapt_runtime.rules import Rule, Write
from adapt_runtime.rules.steps import Steps, newton_schulz
from adapt_runtime.state import FastWeights

if TYPE_CHECKING:
    from adapt_runtime.chunk_grad import Call, ChunkGraph
    from adapt_runtime.config import RuntimeConfig

log = logging.getLogger("adapt_runtime")

# float32 holds 3.4e38; every quantity the kernels square stays below OVERFLOW_GUARD ** 2 = 1e36.
OVERFLOW_GUARD = 1e18


def fire(rule: Rule, states: Sequence[FastWeights], next_tokens: Tensor, config: RuntimeConfig,
         w0_norm: dict[int, float], graphs: dict[int, ChunkGraph], call: Call) -> None:
    """``next_tokens`` `[B]` (one per row) are about to be fed: each row's last fed position gets its targets
    (``chunk.label_last``), and each row whose pending chunk is finished (the next token starts another chunk) has
    that chunk's write applied (``apply``) and its pending chunk cleared. ``graphs``: per ``id(state)`` the chunk's own
    forward with grad, where the rule needs the gradient and the chunk was read in one call (else it is recomputed
    through ``call``, ``chunk_grad.recompute``)."""
    C = config.chunk_size
    tokens = next_tokens.tolist()
    waiting = [b for b, s in enumerate(states) if len(s.pending)]
    label_last(rule, [states[b] for b in waiting], [tokens[b] for b in waiting])
    done = [b for b in waiting if states[b].pending.chunk != states[b].tokens_seen // C]
    chunks = [finished(rule, states[b], tokens[b], config.lr, graphs.get(id(states[b])), call) for b in done]
    for b, chunk, writes in zip(done, chunks, rule.write_rows(chunks) if chunks else []):
        s = states[b]
        apply(s, writes, config, w0_norm, retrieved_for(chunk, writes))
        s.pending.clear()


def retrieved_for(chunk: Chunk, writes: list[Write]) -> dict[int, Tensor]:
    """Per layer, ``S x_t`` of each key of the layer's write, from the chunk's record (``Chunk.retrieved``): only
    where the write's keys are the chunk's own (the same storage, a prefix of its positions)."""
    out = {}
    for w in writes:
        R, x = chunk.retrieved.get(w.layer), chunk.x.get(w.layer)
        if (R is not None and x is not None and w.X.data_ptr() == x.data_ptr() and w.X.shape[1:] == x.shape[1:]
                and w.X.stride() == x.stride() and w.X.shape[0] <= R.shape[0]):
            out[w.layer] = R[: w.X.shape[0]]
    return out


def apply(s: FastWeights, writes: list[Write], config: RuntimeConfig, w0_norm: dict[int, float],
          retrieved: dict[int, Tensor] | None = None) -> bool:
    """One chunk's ``writes`` onto ``s`` under the runtime's ``config`` (decay, clip, norm bound, state rank): every
    layer or none, counted in ``s.writes`` or ``s.refused_writes``; each layer's norm then bounded. ``retrieved``:
    per layer ``S x_t`` of the write's keys as the chunk was read (``retrieved_for``), which the delta form takes
    for ``X S^T`` instead of forming it.

    Returns:
        True when the write was applied, False when it was refused (non-finite or overflowing inputs).
    """
    if config.state_rank is not None:
        return apply_factors(s, writes, config.decay, config.clip, w0_norm, config.state_rank, config.norm_bound)
    if not apply_dense(s, writes, config.decay, config.clip, w0_norm, retrieved):
        return False
    bound_norms(s, config.norm_bound, w0_norm)
    return True


# ------------------------------------------------------------------ the overflow guard
def write_bound(w: Write, retrieval: Tensor | float = 0.0) -> Tensor:
    """A float64 upper bound (NaN if any input is) on the magnitudes the kernels form for write ``w``.

    With ``a_t = |beta_t| ||v_t||`` and ``b_t = ||x_t||``: every entry of every partial sum of
    ``sum_t beta_t v_t x_t^T`` and its Frobenius norm are at most ``sum_t a_t b_t``, and each Gram term
    ``(beta_t beta_s v_t.v_s)(x_t.x_s)`` at most ``a_t a_s b_t b_s``; so the largest of ``max a``, ``max b`` and
    ``sum a b`` bounds them all (``a``, ``b`` themselves, and ``sum a b`` for the sums and norms). The delta form's
    targets ``v_t - erase S x_t`` are formed in the kernel: ``retrieval`` is ``|erase| ||S||_F``, and
    ``||v_t|| + retrieval * b_t`` bounds the target and every partial sum of its retrieval.
    """
    b = torch.linalg.vector_norm(w.X.double(), dim=-1)
    a = w.beta.double().abs() * (torch.linalg.vector_norm(w.V.double(), dim=-1) + retrieval * b)
    if not a.numel():
        return torch.zeros((), dtype=torch.float64, device=a.device)
    return torch.stack([a.max(), b.max(), (a * b).sum()]).max()  # max propagates NaN


def retrieval_norm(S: Tensor) -> Tensor:
    """A float64 upper bound on ``||S||_F`` for the overflow guard, summed in float32 (a float64 pass over a
    real-width S cost as much as the write itself): twice the float32 norm, a margin far beyond float32's rounding
    of the sum of squares and harmless to a guard set at 1e18; an overflow is inf (refused, as the float64 norm of
    so large an S would be), and NaN stays NaN."""
    return torch.linalg.vector_norm(S, dtype=torch.float32).double() * 2.0


def writes_are_safe(s: FastWeights, writes: list[Write], erase: dict[int, float] | None = None) -> bool:
    """True when every layer's write stays below ``OVERFLOW_GUARD``; else the write is counted as refused and
    logged, and nothing may be written (the one check of the dense and the low-rank state). ``erase``: per layer
    the delta form's factor (its retrieval from the layer's S is bounded too)."""
    bounds = []
    for w in writes:
        factor = (erase or {}).get(w.layer, 0.0)
        S = s.S.get(w.layer) if factor else None
        retrieval = 0.0 if S is None else abs(factor) * retrieval_norm(S)
        bounds.append(write_bound(w, retrieval).to(s.spec.device))
    bound = torch.stack(bounds).max()
    if bool(bound <= OVERFLOW_GUARD):  # NaN compares False: refused as well
        return True
    s.refused_writes += 1
    log.warning("refused a fast-weight write with non-finite or overflowing values (chunk %d); no layer was "
                "written", s.pending.chunk)
    return False


# ------------------------------------------------------------------ the step options
def take_steps(s: FastWeights, writes: list[Write], steps: Steps, decay: float, w0_norm: dict[int, float],
               retrieved: dict[int, Tensor] | None = None) -> tuple[list[Write], dict[int, float]]:
    """The writes of ``steps`` (see the module docstring) and, per layer, the ``erase`` left to ``kernels.write``
    (none when the targets were formed here: from ``retrieved``, ``S x_t`` as the chunk was read, where given; none
    either for a layer without S, whose retrieval is zero)."""
    fused = (steps.write_form == "delta" and steps.normalise is None and not steps.orthogonalise
             and not steps.extras)
    out, erase = [], {}
    for w in writes:
        rate = steps.rate(s.spec.layers, w.layer)
        V, X, beta = w.V, w.X, w.beta * rate
        S = s.S[w.layer]
        retrieve = steps.erase * (decay if w.decay is None else w.decay)  # from the decayed S, as gated DeltaNet
        R = None if steps.fast_decay is not None else (retrieved or {}).get(w.layer)
        if steps.write_form == "delta" and S is not None and R is not None:
            V = V.float() - retrieve * R.float()  # the chunk's own S x: the product with S is not formed again
        elif fused and S is not None:
            erase[w.layer] = retrieve
        elif steps.write_form == "delta" and S is not None:
            if steps.fast_decay is not None:  # retrieve from what S decays to: decay (L + g (S - L))
                slow = s.extra.get("slow", {}).get(w.layer)
                S = S.float() * steps.fast_decay + (0 if slow is None else (1 - steps.fast_decay) * slow.float())
            V = V.float() - retrieve * (X.float() @ S.float().T)
        if steps.orthogonalise:
            V = newton_schulz(V.double() * beta.double()[:, None], X).float()
            beta = torch.ones_like(beta)
        if steps.normalise is not None:
            norm = write_norms(V[None], X[None], beta[None])[0]
            if bool(norm > 0) and bool(torch.isfinite(norm)):  # zero stays zero; non-finite stays (refused)
                beta = beta * (steps.normalise * rate * w0_norm[w.layer] / norm.double()).to(beta.dtype)
        out.append(Write(w.layer, V, X, beta, steps, w.decay))
    return out, erase


def extra_tensor(s: FastWeights, name: str, layer: int, like: Tensor) -> Tensor:
    """The state's ``name`` tensor of ``layer`` (``FastWeights.extra``), zeros like ``like`` on first use."""
    part = s.extra.setdefault(name, {})
    t = part.get(layer)
    if t is None:
        t = part[layer] = torch.zeros_like(like)
    elif t.is_inference() and not torch.is_inference_mode_enabled():
        t = part[layer] = t.clone()  # made under inference_mode, written outside it
    return t


def step_with_extras(s: FastWeights, S: Tensor, w: Write, steps: Steps, decay: float, max_norm: Tensor | None) -> None:
    """One layer's step with momentum and/or two time scales (see ``adapt_runtime.rules.steps``), in place."""
    slot = torch.zeros(1, dtype=torch.long, device=S.device)
    keep = decay if steps.fast_decay is None else decay * steps.fast_decay
    if steps.momentum:
        M = extra_tensor(s, "momentum", w.layer, S)
        s.before_change(M)
        kernels.write(M[None], slot, w.V[None], w.X[None], w.beta[None], steps.momentum, None)  # M <- mu M + U
        scale = 1.0
        if max_norm is not None:
            norm = float(torch.linalg.vector_norm(M, dtype=torch.float32))
            scale = min(1.0, float(max_norm[0]) / max(norm, 1e-30))
        S.mul_(keep).add_(M, alpha=scale)
    else:
        kernels.write(S[None], slot, w.V[None], w.X[None], w.beta[None], keep, max_norm)
    if steps.fast_decay is not None:
        L = extra_tensor(s, "slow", w.layer, S)
        s.before_change(L)
        S.add_(L, alpha=decay * (1.0 - steps.fast_decay))  # S' = decay (L + g (S - L)) + step
        L.mul_((1.0 - steps.consolidate) * decay).add_(S, alpha=steps.consolidate)  # L' = decay L + c (S' - decay L)


# ------------------------------------------------------------------ dense S, rank-r factors, the norm bound
def apply_dense(s: FastWeights, writes: list[Write], decay: float, clip: float | None,
                w0_norm: dict[int, float], retrieved: dict[int, Tensor] | None = None) -> bool:
    """Write every layer of ``writes`` into the dense S of ``s`` or none of them; count it (``writes`` or
    ``refused_writes``).

    Returns:
        True when the write was applied, False when it was refused (non-finite or overflowing inputs).
    """
    if not writes:
        return True
    erase: dict[int, float] = {}
    steps = writes[0].steps
    if steps is not None and not steps.plain:
        writes, erase = take_steps(s, writes, steps, decay, w0_norm, retrieved)
    if not writes_are_safe(s, writes, erase):
        return False
    slot = torch.zeros(1, dtype=torch.long, device=s.spec.device)
    for w in writes:
        max_norm = None
        if clip is not None:
            max_norm = torch.tensor([clip * w0_norm[w.layer]], device=s.spec.device)
        S = s.delta(w.layer, create=True)
        if S is None:
            raise RuntimeError(f"layer {w.layer} is not a plastic layer of this state")
        if S.is_inference() and not torch.is_inference_mode_enabled() and not S._is_view():
            S = s.S[w.layer] = S.clone()  # made under inference_mode, written outside it (a slot's view stays put)
        s.before_change(S)  # an open turn keeps its committed S (copy-on-first-write)
        if steps is not None and steps.extras:
            step_with_extras(s, S, w, steps, decay if w.decay is None else w.decay, max_norm)
            continue
        kernels.write(S[None], slot, w.V[None], w.X[None], w.beta[None], decay if w.decay is None else w.decay,
                      max_norm, erase=erase.get(w.layer, 0.0))  # 0: the plain write
    s.writes += 1
    s.bump()
    return True


def apply_factors(s: FastWeights, writes: list[Write], decay: float, clip: float | None, w0_norm: dict[int, float],
                  rank: int, norm_bound: float | None) -> bool:
    """Fold every layer's write into the factors of ``s`` (``lowrank.fold_write``) or none of them (the same refusal
    and counters as ``apply_dense``), then bound each written layer's ``||S||_F`` to ``norm_bound * ||W0||_F``."""
    if not writes:
        return True
    if not writes_are_safe(s, writes):
        return False
    folded = {}
    for w in writes:
        shape = s.spec.shapes[s.spec.layers.index(w.layer)]
        max_norm = None if clip is None else clip * w0_norm[w.layer]
        layer_decay = decay if w.decay is None else w.decay
        new = lowrank.fold_write(s.factors.get(w.layer), shape, w, layer_decay, max_norm, rank)
        if new is None:
            s.refused_writes += 1
            return False
        if norm_bound is not None:
            limit, norm = norm_bound * w0_norm[w.layer], float(torch.linalg.vector_norm(new[0]))
            if norm > limit:
                new = (new[0] * (limit / norm), new[1])
        folded[w.layer] = new
    s.factors.update(folded)
    s.writes += 1
    s.bump()
    return True


def bound_norms(s: FastWeights, bound: float | None, w0_norm: dict[int, float]) -> None:
    """Rescale each layer's S of ``s`` onto ``bound * ||W0||`` where it is larger (in place; None: no bound)."""
    if bound is None:
        return
    present = {layer: S for layer, S in s.S.items() if S is not None}
    if not present:
        return
    # every layer's norm first, then one read of them all (one host sync per write, not one per layer)
    norms = torch.stack([torch.linalg.vector_norm(S, dtype=torch.float32) for S in present.values()]).tolist()
    changed = False
    for (layer, S), norm in zip(present.items(), norms):
        limit = bound * w0_norm[layer]
        if norm > limit:
            s.before_change(S)
            S.mul_(limit / norm)
            slow = s.extra.get("slow", {}).get(layer)  # two time scales: the slow part is part of S
            if slow is not None:
                s.before_change(slow)
                slow.mul_(limit / norm)
            changed = True
    if changed:
        s.bump()
