"""``SlotPool``: resident sessions' fast weights in per-layer slabs `[N, d, f]`, one slot per session.

A multi-row call binds each row's state to a slot. While bound, the state's ``S[layer]`` *is* a view of its slab row,
so the chunk writes (``write.apply``, the norm bound) go in place into the slot and the apply reads S by slot index:
a decode step over rows already resident copies no fast weights. A state's S stays a plain ``[d, f]`` tensor to
everything else (save, clone, fork, ``delta_norms``); one that was replaced (a load, a reset, the first write of a
layer) is copied into the slot on the next bind. A slot is freed when its state is garbage-collected or evicted
(``evict``: the state gets a detached copy of its rows, bit for bit). A layer that a bound row has never written
reads zeros from its slot. A row is changed in place only after ``FastWeights.before_change`` (an open turn's
checkpoint keeps the committed rows it holds a view of, ``adapt_runtime.checkpoint``).

A low-rank runtime (``state_rank=r``) binds with ``bind_factors``: each layer has two slabs, ``B [N, d, r]`` and
``A [N, r, f]``, and a row's factors (rank ``k <= r``) are copied into its slot, zero-padded to ``r``, whenever they
changed (a chunk write replaces them), so a decode step over resident rows copies nothing and applies all rows with
two batched matmuls (``lowrank.apply_slots``). The state keeps its own factors; the slabs are a copy.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from adapt_runtime.state import FastWeights, StateSpec


class SlotPool:
    """Per-layer slab storage for the fast weights of the states a runtime decodes together.

    Args:
        spec: the runtime's state spec (layers, ``(d, f)`` shapes, dtype, device).
        max_slots: most slots held (None: grow as needed); past it, the least recently bound state not in the
            call is evicted, and a call with more rows than ``max_slots`` is not bound at all.
    """

    def __init__(self, spec: StateSpec, max_slots: int | None = None) -> None:
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots must be >= 1 or None, got {max_slots}")
        self.spec, self.max_slots = spec, max_slots
        self.slabs: dict[int, Tensor] = {}
        self.factor_slabs: dict[int, tuple[Tensor, Tensor]] = {}  # state_rank: per layer (B [N, d, r], A [N, r, f])
        self._owner: list[weakref.ref[FastWeights] | None] = []
        self._views: list[dict[int, Tensor]] = []  # per slot: the view of each layer's row handed to the state
        self._zero: list[set[int]] = []  # per slot: layers whose row is known to hold zeros
        self._used: list[int] = []  # per slot: the bind counter when last bound (least recently used first out)
        self._slot_of: weakref.WeakKeyDictionary[FastWeights, int] = weakref.WeakKeyDictionary()
        self._clock = 0
        self._slots_cache: tuple[tuple[int, ...], Tensor] | None = None

    @property
    def capacity(self) -> int:
        return len(self._owner)

    def bound(self) -> int:
        """How many slots are held by live states."""
        return sum(1 for k in range(self.capacity) if not self._is_free(k))

    def slot_of(self, state: FastWeights) -> int | None:
        """The slot ``state`` is bound to, or None."""
        return self._slot_of.get(state)

    def bind(self, states: list[FastWeights], layers: list[int]) -> Tensor | None:
        """Bind each row's state to a slot and make its S of ``layers`` the slot's rows; the `[B]` slot indices.

        None when the rows do not fit ``max_slots`` (the caller then stacks S as without a pool).
        """
        slots = self._assign_all(states)
        if slots is None:
            return None
        for layer in layers:
            slab = self._slab(layer)
            for s, k in zip(states, slots):
                self._load(s, k, layer, slab)
        return self._slot_tensor(slots)

    def bind_factors(self, states: list[FastWeights], layers: list[int], rank: int) -> Tensor | None:
        """``bind`` for a low-rank runtime: each row's factors of ``layers`` copied into its slot of the
        ``factor_slabs`` (zero-padded to ``rank``) where they changed since; the `[B]` slot indices or None."""
        slots = self._assign_all(states)
        if slots is None:
            return None
        for layer in layers:
            B_slab, A_slab = self._factor_slab(layer, rank)
            for s, k in zip(states, slots):
                current = s.factors.get(layer)
                if current is not None and current is self._views[k].get(layer):
                    continue  # unchanged since it was copied in
                if current is None:
                    if layer not in self._zero[k]:
                        B_slab[k].zero_()
                        A_slab[k].zero_()
                        self._zero[k].add(layer)
                    self._views[k].pop(layer, None)
                    continue
                B, A = current
                with torch.inference_mode(False):
                    B_slab[k, :, : B.shape[1]].copy_(B)
                    B_slab[k, :, B.shape[1] :].zero_()
                    A_slab[k, : A.shape[0]].copy_(A)
                    A_slab[k, A.shape[0] :].zero_()
                self._views[k][layer] = current  # the factors the slot holds a copy of (compared by identity)
                self._zero[k].discard(layer)
        return self._slot_tensor(slots)

    def evict(self, state: FastWeights) -> None:
        """Move ``state`` out of its slot: its S becomes a detached copy (bit for bit) and the slot is free."""
        k = self._slot_of.pop(state, None)
        if k is None:
            return
        for layer, view in self._views[k].items():
            state.before_change(view)  # the slot goes to another state: a checkpoint keeps its own copy
            if state.S.get(layer) is view:
                state.S[layer] = torch.clone(view)
        self._free(k)

    def trim(self) -> None:
        """Drop the free slots: bound rows move (values unchanged) into slabs just large enough to hold them."""
        live = [k for k in range(self.capacity) if not self._is_free(k)]
        with torch.inference_mode(False):
            for layer, slab in list(self.slabs.items()):
                self.slabs[layer] = slab[live].clone() if live else slab[:0].clone()
                for j, k in enumerate(live):
                    owner, view = self._owner_of(k), self._views[k].get(layer)
                    if view is not None and owner.S.get(layer) is view:
                        owner.S[layer] = self._views[k][layer] = self.slabs[layer][j]
                    elif view is not None:
                        del self._views[k][layer]
            for layer, pair in list(self.factor_slabs.items()):
                self.factor_slabs[layer] = tuple(t[live].clone() if live else t[:0].clone() for t in pair)
        for j, k in enumerate(live):
            self._slot_of[self._owner_of(k)] = j
        self._owner = [self._owner[k] for k in live]
        self._views = [self._views[k] for k in live]
        self._zero = [self._zero[k] for k in live]
        self._used = [self._used[k] for k in live]
        self._slots_cache = None

    # ------------------------------------------------------------------ internals
    def _assign_all(self, states: list[FastWeights]) -> list[int] | None:
        if self.max_slots is not None and len(states) > self.max_slots:
            return None
        self._clock += 1
        new_rows = sum(1 for s in states if s not in self._slot_of)
        free = sum(1 for k in range(self.capacity) if self._is_free(k))
        if free - new_rows > self.capacity // 2:  # most slots' sessions are gone: give their memory back
            self.trim()
            free = 0
        missing = new_rows - free
        if missing > 0 and (self.max_slots is None or self.capacity < self.max_slots):
            self._grow(missing)  # once per call, not once per new row
        return [self._assign(s, states) for s in states]

    def _slot_tensor(self, slots: list[int]) -> Tensor:
        key = tuple(slots)
        if self._slots_cache is None or self._slots_cache[0] != key:
            self._slots_cache = (key, torch.tensor(slots, dtype=torch.long, device=self.spec.device))
        return self._slots_cache[1]

    def _factor_slab(self, layer: int, rank: int) -> tuple[Tensor, Tensor]:
        slabs = self.factor_slabs.get(layer)
        if slabs is None:
            d, f = self.spec.shapes[self.spec.layers.index(layer)]
            with torch.inference_mode(False):
                slabs = (torch.zeros(self.capacity, d, rank, device=self.spec.device),
                         torch.zeros(self.capacity, rank, f, device=self.spec.device))
            self.factor_slabs[layer] = slabs
            for k in range(self.capacity):
                self._zero[k].add(layer)
        return slabs

    def _assign(self, state: FastWeights, call: list[FastWeights]) -> int:
        k = self._slot_of.get(state)
        if k is None:
            k = self._free_slot(call)
            self._slot_of[state] = k
            self._owner[k] = weakref.ref(state)
        self._used[k] = self._clock
        return k

    def _free_slot(self, call: list[FastWeights]) -> int:
        for k in range(self.capacity):
            if self._is_free(k):
                self._free(k)
                return k
        if self.max_slots is None or self.capacity < self.max_slots:
            return self._grow(1)
        in_call = {id(s) for s in call}
        k = min((k for k in range(self.capacity) if id(self._owner_of(k)) not in in_call), key=self._used.__getitem__)
        self.evict(self._owner_of(k))
        return k

    def _owner_of(self, k: int) -> FastWeights:
        """The state bound to slot ``k``, which must be live (its owner alive)."""
        ref = self._owner[k]
        owner = ref() if ref is not None else None
        if owner is None:
            raise RuntimeError(f"slot {k} is free: it has no owner")
        return owner

    def _is_free(self, k: int) -> bool:
        owner = self._owner[k]
        return owner is None or owner() is None

    def _free(self, k: int) -> None:
        self._owner[k], self._views[k], self._zero[k] = None, {}, set()

    def _grow(self, at_least: int) -> int:
        """Add slots (``at_least``, or half as many again, within ``max_slots``); the first new slot's index."""
        old = self.capacity
        new = max(old + at_least, old + old // 2)
        if self.max_slots is not None:
            new = min(new, self.max_slots)
        with torch.inference_mode(False):  # normal tensors: written in and outside inference mode alike
            for layer, slab in self.slabs.items():
                grown = slab.new_zeros(new, *slab.shape[1:])
                grown[:old].copy_(slab)
                self.slabs[layer] = grown
                for k in range(old):
                    view = self._views[k].get(layer)
                    ref = self._owner[k]
                    owner = ref() if ref is not None else None
                    if view is None:
                        continue
                    if owner is not None and owner.S.get(layer) is view:
                        owner.S[layer] = self._views[k][layer] = grown[k]
                    else:
                        del self._views[k][layer]
            for layer, pair in self.factor_slabs.items():
                grown_pair = tuple(t.new_zeros(new, *t.shape[1:]) for t in pair)
                for g, t in zip(grown_pair, pair):
                    g[:old].copy_(t)
                self.factor_slabs[layer] = grown_pair
        for _ in range(old, new):
            self._owner.append(None)
            self._views.append({})
            self._zero.append(set())
            self._used.append(0)
        return old

    def _slab(self, layer: int) -> Tensor:
        slab = self.slabs.get(layer)
        if slab is None:  # a layer's first bind; ``_grow`` keeps existing slabs at the capacity
            d, f = self.spec.shapes[self.spec.layers.index(layer)]
            with torch.inference_mode(False):
                slab = torch.zeros(self.capacity, d, f, dtype=self.spec.dtype, device=self.spec.device)
            self.slabs[layer] = slab
            for k in range(self.capacity):
                self._zero[k].add(layer)
        return slab

    def _load(self, s: FastWeights, k: int, layer: int, slab: Tensor) -> None:
        current, view = s.S[layer], self._views[k].get(layer)
        if current is not None and current is view:
            return  # resident: its writes went in place
        if view is not None:
            s.before_change(view)  # the row changes under a view an open turn's checkpoint may hold
        if current is None:
            if layer not in self._zero[k]:
                slab[k].zero_()
                self._zero[k].add(layer)
            self._views[k].pop(layer, None)
            return
        with torch.inference_mode(False):
            slab[k].copy_(current)
            view = slab[k]
        s.S[layer] = self._views[k][layer] = view
        self._zero[k].discard(layer)
