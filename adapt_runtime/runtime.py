"""``Runtime``: chunked apply-then-update over a patched model, one ``FastWeights`` per batch row.

Semantics (ARCHITECTURE §3): chunks are absolute positions of a state's stream; every token of chunk i is computed
with S_i; the write of chunk i fires when the first token of chunk i+1 is fed, just before it is computed, so
feeding a stream in one call, in pieces or token by token gives the same logits and the same final state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from adapt_runtime.architectures import ArchSpec, set_path
from adapt_runtime.chunk import FINAL_SCALE, RETRIEVED, label_last, labelled, record
from adapt_runtime.chunk_grad import ChunkGraph, autograd_on, graph_of, normal
from adapt_runtime.config import RuntimeConfig
from adapt_runtime.errors import ContextOverflowError
from adapt_runtime.kv import assemble, scatter
from adapt_runtime.one_pass import OnePass
from adapt_runtime.plastic import Binding, PlasticDown
from adapt_runtime.rules import Rule
from adapt_runtime.slots import SlotPool
from adapt_runtime.state import FastWeights, StateSpec
from adapt_runtime.write import fire

if TYPE_CHECKING:
    from adapt_runtime.read import ReadResult


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated, to be removed in 5.40), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Runtime:
    """A patched model with its rule. Built by ``adapt_runtime.patch``; holds no session state itself."""

    def __init__(self, model: nn.Module, spec: ArchSpec, config: RuntimeConfig, rule: Rule,
                 plastic: dict[int, PlasticDown], hooks: list, fingerprint: str) -> None:
        self.model, self.arch, self.config, self.rule = model, spec, config, rule
        self.plastic, self._hooks = plastic, hooks
        weight = next(iter(plastic.values())).weight0
        self.device = weight.device
        self.state_spec = StateSpec(
            fingerprint=fingerprint, rule=config.rule, config_json=config.to_json(), layers=config.layers,
            shapes=tuple(tuple(plastic[i].weight0.shape) for i in config.layers), chunk_size=config.chunk_size,
            dtype=config.torch_state_dtype, device=self.device)
        self._w0_norm = {i: float(torch.linalg.vector_norm(plastic[i].weight0.detach().float())) for i in config.layers}
        self._merge_ok = weight.dtype in (torch.float32, torch.float64)
        self._merged_key: tuple[int, int] | None = None
        self._merged: dict[int, Tensor] = {}
        cfg = model.config
        self.max_length = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0)
                              or 1 << 30)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._capture = rule.capture | ({FINAL_SCALE} if rule.reads_final_norm else set())
        # the delta form retrieves S x at the write: a dense state records it where the forward forms it apart
        steps = getattr(rule, "steps", None)
        self._retrieves = (config.state_rank is None and steps is not None and steps.write_form == "delta"
                           and steps.fast_decay is None)
        self._cache_arg = cache_argument(model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # multi-row calls keep each row's S in slot storage (None: stack every row's S per call, as before)
        self.slot_pool: SlotPool | None = SlotPool(self.state_spec)
        self.one_pass = True  # layer-local rules read spans in one pass (False: segment by segment, as other rules)
        # the delta form's retrieval recorded in the forward (False: formed at the write, as before; benchmarks)
        self.record_retrieval = True
        self.patched = True

    def __repr__(self) -> str:
        c = self.config
        return (f"Runtime(model={type(self.model).__name__}, rule={self.rule!r}, chunk_size={c.chunk_size}, "
                f"layers={list(c.layers)}, lr={c.lr}, decay={c.decay}, clip={c.clip})")

    def new_state(self) -> FastWeights:
        """A fresh session state: S = 0 (the base model), empty stream."""
        return FastWeights(self.state_spec)

    def unpatch(self) -> None:
        """Put the original down projections back (the same module objects) and remove the hooks."""
        if not self.patched:
            return
        layers = self.model
        for part in self.arch.layers.split("."):
            layers = getattr(layers, part)
        for i, wrapper in self.plastic.items():
            set_path(layers[i], self.arch.down, wrapper.base)
        for hook in self._hooks:
            hook.remove()
        self.patched = False

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor | Sequence[int], state: FastWeights | list[FastWeights],
                adapt: bool = True, logits: str = "all") -> Tensor:
        """Feed tokens to each row's state and return logits `[B, T, V]` (see the module docstring).

        A rule that is ``layer_local`` reads the tokens in one pass through the model (``adapt_runtime.one_pass``);
        other rules, segment by segment (one model call per piece up to each chunk boundary). Both give the same
        logits and state.

        Args:
            input_ids: `[T]`, `[B, T]` or a list of ids.
            state: one state per row (a single state for B = 1).
            adapt: write the fast weights as chunks complete; False applies S and never writes.
            logits: ``"all"`` returns `[B, T, V]`; ``"last"`` the last position's `[B, 1, V]` (generation): the
                unembedding then runs only where something reads it (the rule's own logits are still computed).
        """
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        last = logits == "last"
        ids, states = self._rows(input_ids, state)
        rows, total = ids.shape
        for s in states:
            if s.kv_len + total > self.max_length:
                raise ContextOverflowError(
                    f"{s.kv_len} cached + {total} new tokens exceed the model's {self.max_length} positions; "
                    "call state.drop_kv() to continue with the fast weights alone")
        if not adapt and self.rule.adapts and total:  # the unadapted positions are skipped, the labels stay aligned
            label_last(self.rule, states, ids[:, 0].tolist())
        adapt = adapt and self.rule.adapts
        if adapt and total > 1 and self._one_pass_rule():
            self._fire_writes(states, ids[:, 0], {})  # the segment path's first step (a second one is a no-op)
            out = self._one_pass(ids, states, last)
            if out is not None:
                return self._finish(out, states)
        # the rule's logits: every position of a call when it reads them; else only what the caller reads
        keep = 0 if not last or (adapt and (self.rule.targets_read_logits or self.rule.needs_grad)) else 1
        C = self.config.chunk_size
        outs: list[Tensor] = []
        graphs: dict[int, ChunkGraph] = {}
        pos = 0
        while pos < total:
            if adapt:
                self._fire_writes(states, ids[:, pos], graphs)
            graphs = {}
            seg = total - pos
            if adapt:
                seg = min(seg, min(C - s.tokens_seen % C for s in states))
            grad = (adapt and self.rule.needs_grad and rows == 1 and states[0].tokens_seen % C == 0
                    and seg == C and pos + seg < total)
            capture = set(self._capture) if adapt else set()
            if adapt and self._retrieves and self.record_retrieval:
                capture.add(RETRIEVED)
            if grad:
                capture.add("x")
            seg_ids = ids[:, pos : pos + seg]
            scores, bindings = self._call(seg_ids, states, frozenset(capture), grad, keep)
            nxt = ids[:, pos + 1 : pos + seg + 1]
            starts = [s.tokens_seen for s in states]
            for b, s in enumerate(states):
                s.tokens.extend(seg_ids[b].tolist())
                if grad:
                    graphs[id(s)] = graph_of(scores, bindings, b)
            if adapt:
                record(self.rule, states, starts, bindings, scores.detach(), nxt, C, n=seg)
            outs.append(scores[:, -1:].detach() if last else scores.detach())
            pos += seg
        if not outs:
            return torch.empty(rows, 0, self.vocab_size)
        return self._finish(outs[-1] if last else outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), states)

    def _finish(self, out: Tensor, states: list[FastWeights]) -> Tensor:
        out = out.float()
        for b, s in enumerate(states):
            s.last_logits = out[b, -1].clone()  # a copy: callers may edit the returned logits in place
            s.compact()  # the stream keeps what its KV cache and pending chunk cover (bounded memory)
        return out

    def _rows(self, input_ids, state) -> tuple[Tensor, list[FastWeights]]:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(ids.shape)}")
        states = [state] if isinstance(state, FastWeights) else list(state)
        if len(states) != ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} rows of input_ids but {len(states)} states")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("each row needs its own state object")
        for s in states:
            if s.spec is not self.state_spec:
                raise ValueError("state was made by another runtime; use rt.new_state() or ar.load_state(path, rt)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        return ids, states

    def _call(self, ids: Tensor, states: list[FastWeights], capture: frozenset[str],
              grad: bool, keep: int = 0) -> tuple[Tensor, dict[int, Binding]]:
        if grad:  # autograd on even under torch.no_grad() / torch.inference_mode(), on normal (not inference) tensors
            with autograd_on():
                return self._call_model(normal(ids), states, capture, grad, keep)
        return self._call_model(ids, states, capture, grad, keep)

    def _call_model(self, ids: Tensor, states: list[FastWeights], capture: frozenset[str], grad: bool,
                    keep: int = 0, one_pass: OnePass | None = None) -> tuple[Tensor, dict[int, Binding]]:
        """One model call; ``keep``: the logits of the last ``keep`` positions only (0: all)."""
        batched = assemble(states, ids.shape[1], self.device)
        if one_pass is None:
            bindings = self._bind(states, capture, grad, ids.shape[1])
        else:  # each layer applies and writes its rows' chunks itself
            bindings = {i: Binding(capture=capture, rows=len(states), one_pass=one_pass) for i in self.plastic}
            for i, wrapper in self.plastic.items():
                wrapper.binding = bindings[i]
        extra = {"logits_to_keep": keep} if keep and self._keeps_logits else {}
        try:
            with torch.set_grad_enabled(grad):
                out = self.model(input_ids=ids, attention_mask=batched.attention_mask, use_cache=True,
                                 position_ids=batched.position_ids, **{self._cache_arg: batched.cache}, **extra)
        finally:
            for wrapper in self.plastic.values():
                wrapper.binding = None
        scatter(batched, states)
        for s in states:
            s.kv_tokens += ids.shape[1]
        return (out.logits[:, -keep:] if keep else out.logits), bindings

    # ------------------------------------------------------------------ one pass
    def _one_pass_rule(self) -> bool:
        """Whether spans may run in one pass: a layer-local rule on a dense state."""
        rule = self.rule
        return (self.one_pass and bool(rule.layer_local) and self.config.state_rank is None and not rule.needs_grad
                and not rule.reads_final_norm)

    def _one_pass(self, ids: Tensor, states: list[FastWeights], last: bool) -> Tensor | None:
        """Feed ``ids`` in one model call (``adapt_runtime.one_pass``); the logits, or None (nothing changed but the
        attempt's time) when the segment path must read them: no chunk completes inside the span, a stashing rule's
        pending chunk lacks targets, or a layer could not write a chunk as the segment path would."""
        rule, C, total = self.rule, self.config.chunk_size, ids.shape[1]
        if rule.stashes_targets and any(len(s.pending) != labelled(s.pending) for s in states):
            return None
        c = self.config
        plan = OnePass.plan(rule, states, ids, C, lr=c.lr, decay=c.decay, clip=c.clip, norm_bound=c.norm_bound,
                            w0_norm=self._w0_norm)
        if not plan.fires:
            return None
        trails = [row.trail for row in plan.rows]
        keep = 0
        if last:  # the pending positions' logits for a rule that reads them, else the last position's
            keep = max(total - t for t in trails) if rule.targets_read_logits else 1
        saved = [(s.kv, s.kv_tokens) for s in states]
        logits, bindings = self._call_model(ids, states, frozenset(rule.capture), False, keep, plan)
        counts = [{plan.fired[i][b] for i in self.plastic} for b in range(len(states))]
        if plan.failed or any(len(n) != 1 for n in counts):
            for s, (kv, kv_tokens) in zip(states, saved):
                s.kv, s.kv_tokens = kv, kv_tokens
            return None
        logits = logits.detach()
        for b, s in enumerate(states):
            row, fired = plan.rows[b], counts[b].pop()
            if fired:
                for i in self.plastic:
                    s.S[i] = plan.S[i][b]
                s.writes += fired
                s.bump()
            if row.consumes_pending:
                s.pending.clear()
            start, t = s.tokens_seen, trails[b]
            s.tokens.extend(ids[b].tolist())
            n = total - t
            trailing = logits[b : b + 1, -n:] if rule.targets_read_logits else logits[b : b + 1, -1:].expand(1, n, -1)
            records = {i: Binding(records={k: v[b : b + 1, t:] for k, v in bnd.records.items()})
                       for i, bnd in bindings.items()}
            record(rule, [s], [start + t], records, trailing, ids[b : b + 1, t + 1 :], C)
        return logits[:, -1:] if last else logits

    def _bind(self, states: list[FastWeights], capture: frozenset[str], grad: bool,
              steps: int = 1) -> dict[int, Binding]:
        """The plastic layers' bindings for one call of ``steps`` tokens per row. A single float row reads
        ``W0 + S`` merged (reused until S changes), except where the delta form's retrieval is recorded and the call
        reads several tokens: there ``S x`` is applied apart and kept, and the write forms no product with S (the
        same multiply-adds as the merged call's retrieval at the write, without the merge)."""
        rank = self.config.state_rank
        if rank is not None:
            return self._bind_factors(states, capture, grad, rank)
        bindings = {}
        single = states[0] if len(states) == 1 else None
        merge = self._merge_ok and (steps == 1 or RETRIEVED not in capture)
        if single is not None and merge and not single.is_zero:
            self._refresh_merged(single)
        slots, pool = None, self.slot_pool
        if single is None and pool is not None and not grad:
            layers = [i for i in self.plastic if any(s.S[i] is not None for s in states)]
            slots = pool.bind(states, layers) if layers else None
        for i, wrapper in self.plastic.items():
            binding = Binding(capture=capture, grad_probe=grad, rows=len(states))
            deltas = [s.S[i] for s in states]
            if single is not None and deltas[0] is not None:
                if merge:
                    binding.merged = normal(self._merged[i]) if grad else self._merged[i]
                else:
                    binding.per_row = (normal(deltas[0]) if grad else deltas[0])[None]
            elif pool is not None and slots is not None and any(d is not None for d in deltas):
                binding.per_row, binding.slots = pool.slabs[i], slots
            elif any(d is not None for d in deltas):
                zero = torch.zeros(wrapper.weight0.shape, dtype=self.state_spec.dtype, device=self.device)
                binding.per_row = torch.stack([d if d is not None else zero for d in deltas])
            wrapper.binding = bindings[i] = binding
        return bindings

    def _bind_factors(self, states: list[FastWeights], capture: frozenset[str], grad: bool,
                      rank: int) -> dict[int, Binding]:
        """``state_rank`` ``rank``: each row's factors, applied as ``W0 x + B (A x)`` (``adapt_runtime.lowrank``)."""
        bindings, slots, pool = {}, None, self.slot_pool
        if len(states) > 1 and pool is not None and not grad:  # rows read their slots' factor slabs
            layers = [i for i in self.plastic if any(s.factors.get(i) is not None for s in states)]
            slots = pool.bind_factors(states, layers, rank) if layers else None
        for i, wrapper in self.plastic.items():
            rows = [s.factors.get(i) for s in states]
            if grad:
                rows = [None if f is None else (normal(f[0]), normal(f[1])) for f in rows]
            factors = rows if any(f is not None for f in rows) else None
            binding = Binding(capture=capture, grad_probe=grad, rows=len(states), factors=factors)
            if pool is not None and slots is not None and factors is not None:
                binding.factors, binding.factor_slabs, binding.slots = None, pool.factor_slabs[i], slots
            wrapper.binding = bindings[i] = binding
        return bindings

    def _refresh_merged(self, state: FastWeights) -> None:
        key = (id(state), state.version)
        if self._merged_key != key:
            merged = {}
            for i, w in self.plastic.items():
                S = state.S[i]
                merged[i] = w.weight0 if S is None else w.weight0 + S.to(w.weight0.dtype)
            self._merged = merged
            self._merged_key = key

    # ------------------------------------------------------------------ writes
    def _fire_writes(self, states: list[FastWeights], next_tokens: Tensor, graphs: dict[int, ChunkGraph]) -> None:
        """The writes of the rows whose chunk ``next_tokens`` finishes (``adapt_runtime.write.fire``)."""
        fire(self.rule, states, next_tokens, self.config, self._w0_norm, graphs, self._call)

    def read(self, input_ids: Tensor | Sequence[int], state: FastWeights, window: int | None = None,
             progress: bool = False, on_window: Callable[[int, int, float], None] | None = None) -> ReadResult:
        """Read a document of any length into ``state``, window by window (see ``adapt_runtime.read``)."""
        from adapt_runtime.read import read

        return read(self, input_ids, state, window=window, progress=progress, on_window=on_window)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: Tensor | Sequence[int], state: FastWeights, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop_ids: Sequence[int] = (), adapt: bool = True) -> Iterator[int]:
        """Stream sampled token ids for one row (see ``adapt_runtime.generate.generate``)."""
        from adapt_runtime.generate import generate

        return generate(self, input_ids, state, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed, stop_ids=stop_ids, adapt=adapt)
