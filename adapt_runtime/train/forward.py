"""``PlasticLM``: a causal LM and its learned rule, with the runtime's chunked apply-then-write in the forward
and autograd through the writes across chunks (backprop through S).

The forward is the runtime's semantics (ARCHITECTURE §3), for B independent streams starting at S = 0: chunks are
absolute, every token of chunk i is computed with S_i, and after chunk i (once its last position's label, the
first token of chunk i+1, exists) ``S_{i+1} = lambda_i S_i + U_i`` (``adapt_runtime.train.update``). A stream is read
in context windows of ``window`` tokens (a multiple of C) with the KV cache dropped between windows, as
``Runtime.read`` does, so S is the only path from one window to the next. The gradient form takes ``dL/dy`` of the
chunk's own forward with ``create_graph`` when the outer loss needs gradients (Duan et al.); as in the runtime, the
last chunk of a window is written after the KV is dropped, so its gradient is that of the chunk recomputed alone.
The inputs are token ids or, for models fed vectors (the seed papers' tasks), ``embeds`` `[B, T, d]`; then a rule
must not read the next tokens (``PlasticityConfig.needs_labels``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from adapt_runtime.architectures import arch_spec, get_path
from adapt_runtime.runtime import cache_argument
from adapt_runtime.train.hooks import FastWeightHooks
from adapt_runtime.train.params import RuleParams
from adapt_runtime.train.update import ChunkInputs, chunk_updates, position_targets


@dataclass
class PlasticOutput:
    """logits `[B, T, V]`; S per plastic layer `[B, d, f]` after the writes of every chunk whose label is known;
    writes: how many chunks were written."""

    logits: Tensor
    S: dict[int, Tensor]
    writes: int

    def loss(self, ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``ids`` `[B, T]` under the logits (positions 0..T-2)."""
        logits = self.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def down_shapes(model: nn.Module, layers: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """Per layer the ``(d, f)`` of its down projection's ``W0``."""
    spec = arch_spec(model)
    decoder = get_path(model, spec.layers)
    shapes = {}
    for i in layers:
        w = get_path(decoder[i], spec.down).weight
        shapes[i] = tuple(w.T.shape) if spec.conv1d else tuple(w.shape)
    return shapes


class PlasticLM(nn.Module):
    """``model`` (a HF causal LM, left unmodified) with plastic down projections driven by ``rule``."""

    def __init__(self, model: nn.Module, rule: RuleParams) -> None:
        super().__init__()
        self.model, self.rule = model, rule
        self.spec = arch_spec(model)
        self.config = rule.config
        n_layers = len(get_path(model, self.spec.layers))
        bad = [i for i in self.config.layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"plastic layers {bad} out of range for a model with {n_layers} layers")
        self._cache_arg = cache_argument(model)
        self._unembed = model.get_output_embeddings().weight

    def forward(
        self, ids: Tensor | None, window: int | None = None, adapt: bool = True, embeds: Tensor | None = None
    ) -> PlasticOutput:
        """Read ``ids`` `[B, T]` (each row a stream from S = 0) in windows of ``window`` tokens (None: one context).

        Args:
            adapt: False never writes (S stays 0: the model as it is, for the static baseline).
            embeds: the input vectors `[B, T, d]` instead of ``ids`` (None), for a rule that reads no labels.
        """
        if embeds is not None:
            if embeds.dim() != 3:
                raise ValueError(f"embeds must be [B, T, d], got shape {tuple(embeds.shape)}")
            if adapt and self.config.needs_labels:
                raise ValueError("this rule reads the next tokens: pass ids, not embeds")
            rows, total = embeds.shape[:2]
            device = embeds.device
            source, given = embeds, False  # the model reads vectors
        else:
            if ids is None or ids.dim() != 2:
                raise ValueError(f"ids must be [B, T], got {None if ids is None else tuple(ids.shape)}")
            rows, total = ids.shape
            device = ids.device
            source, given = ids, True  # the model reads token ids
        C = self.config.chunk_size

        def part(a: int, b: int) -> tuple[Tensor | None, Tensor | None]:
            return (source[:, a:b], None) if given else (None, source[:, a:b])

        window = window or total
        if window % C:
            raise ValueError(f"window {window} must be a multiple of the chunk size {C}")
        hooks = FastWeightHooks(self.model, self.spec, self.config.layers)
        hooks.rows = rows
        outer = torch.is_grad_enabled()
        gradient = adapt and self.config.form == "gradient"
        outs, writes = [], 0
        # the fused attention kernels have no double backward: the create_graph form runs sdpa's math kernel
        kernel = sdpa_kernel(SDPBackend.MATH) if gradient and outer else nullcontext()
        try:
            with kernel:
                for start in range(0, total, window):
                    end = min(start + window, total)
                    cache = DynamicCache()
                    for c0 in range(start, end, C):
                        c1 = min(c0 + C, end)
                        with torch.set_grad_enabled(outer or gradient):
                            logits = self._call(hooks, part(c0, c1), cache, c0 - start, gradient)
                        records = {i: dict(r) for i, r in hooks.records.items()}
                        if adapt and c1 - c0 == C and c1 < total:
                            labels = None if ids is None else ids[:, c0 + 1 : c1 + 1]
                            fresh = gradient and c1 == end  # written after the next window dropped the KV
                            inputs = self._inputs(
                                hooks, records, logits, labels, part(c0, c1) if fresh else None, outer
                            )
                            for i, update in chunk_updates(self.rule, inputs).items():
                                S = hooks.S[i] if hooks.S[i] is not None else self._zeros(i, rows, device)
                                hooks.S[i] = update.apply(S) if outer else update.apply(S).detach()
                            writes += 1
                        outs.append(logits if outer else logits.detach())
        finally:
            hooks.remove()
        S = {i: (s if s is not None else self._zeros(i, rows, device)) for i, s in hooks.S.items()}
        return PlasticOutput(torch.cat(outs, dim=1), S, writes)

    def _zeros(self, layer: int, rows: int, device: torch.device) -> Tensor:
        w = get_path(get_path(self.model, self.spec.layers)[layer], self.spec.down).weight
        shape = tuple(w.T.shape) if self.spec.conv1d else tuple(w.shape)
        return torch.zeros(rows, *shape, dtype=w.dtype, device=device)

    def _call(
        self,
        hooks: FastWeightHooks,
        inputs: tuple[Tensor | None, Tensor | None],
        cache: DynamicCache,
        offset: int,
        probe: bool,
    ) -> Tensor:
        """The logits of one chunk, ``inputs`` its ``(ids, None)`` or ``(None, embeds)``."""
        hooks.probe = probe
        for r in hooks.records.values():
            r.clear()
        ids, embeds = inputs
        given = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        ref = ids if embeds is None else embeds
        if ref is None:
            raise ValueError("a chunk is read from its ids or its embeds; both are None")
        positions = torch.arange(offset, offset + ref.shape[1], device=ref.device)[None].expand(ref.shape[0], -1)
        out = self.model(**given, position_ids=positions, use_cache=True, **{self._cache_arg: cache})
        return out.logits

    def _inputs(
        self,
        hooks: FastWeightHooks,
        records: dict[int, dict[str, Tensor]],
        logits: Tensor,
        labels: Tensor | None,
        fresh: tuple[Tensor | None, Tensor | None] | None,
        outer: bool,
    ) -> ChunkInputs:
        """The chunk's ``ChunkInputs`` (``fresh``: recompute the chunk alone for the gradient form)."""
        config, layers = self.config, self.config.layers
        x = {i: records[i]["x"] for i in layers}
        inputs = ChunkInputs(x=x, h={i: records[i]["h"] for i in layers})
        if config.form == "gradient":
            if fresh is not None:
                with torch.enable_grad():
                    logits = self._call(hooks, fresh, DynamicCache(), 0, True)
                x = inputs.x = {i: hooks.records[i]["x"] for i in layers}
                ys = [hooks.records[i]["y"] for i in layers]
            else:
                ys = [records[i]["y"] for i in layers]
            with torch.enable_grad():
                if config.inner == "internal":
                    inner = self.rule.internal_loss(logits)
                else:
                    if labels is None:
                        raise ValueError("the gradient form's next-token loss needs the chunk's labels")
                    flat = logits.reshape(-1, logits.shape[-1])
                    inner = F.cross_entropy(flat, labels.reshape(-1), reduction="sum")
                grads = torch.autograd.grad(inner, ys, create_graph=outer)
            inputs.grads = dict(zip(layers, grads))
            if not outer:
                inputs.x = {i: t.detach() for i, t in x.items()}
            return inputs
        if config.target == "output" or config.form == "delta":
            inputs.y = {i: records[i]["y"] for i in layers}
        if config.form == "delta":
            inputs.retrieved = {i: _retrieve(x[i], hooks.S[i], inputs.y[i]) for i in layers}
        if config.needs_targets:
            inputs.targets = position_targets(config, self._unembed, logits, labels)
        return inputs


def _retrieve(x: Tensor, S: Tensor | None, like: Tensor) -> Tensor:
    """``S x_t`` of every key `[B, n, d]` (zeros like ``like`` for a layer without S yet)."""
    return torch.zeros_like(like) if S is None else torch.einsum("bnf,bdf->bnd", x, S.to(x.dtype))
