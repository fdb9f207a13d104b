"""Session turns for ``benchmarks/scale.py --turns``: what a turn costs besides its model work, and the memory an
active session holds, on the shape's random-init model.

``--sessions`` (its largest value, B) sessions live in a ``SessionStore``, each with a committed state that read a
``--prompt`` and decoded with the others (so each holds a slot). A round opens a turn on every session as a request
does (``serving.turn.open_turn``), takes ``--decode`` decode steps of the B turn states together (one batched
``rt.forward`` per step, as the scheduler does), then ends every turn: ``Turn.finish`` (commit) or ``Turn.close``
without it (rollback). A bare round takes the same steps on the committed states with no turn. Per-turn overhead
is (turn round - bare round) / B, the minimum of ``--repeats`` alternating rounds of each; open and end are timed
on their own as well. Bytes copied per turn: what copying ops (``CopyCounter``) wrote in a turn round and the
bare round after it less in two bare rounds, / B (exact, where the times are as noisy as the machine). Memory per active
session: the distinct tensor storages (S, KV, the rule's extras, the pending chunk, the last logits, the runtime's
slot slabs, what a turn holds besides) while every turn is open, just opened and after its last step, / B. Only the
public turn functions are called, so the same code measures any version of ``serving.turn``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from adapt_runtime.serving.sessions.files import SessionFiles
from adapt_runtime.serving.sessions.local_store import SessionStore
from adapt_runtime.serving.sessions.turn import open_turn
from torch.utils._python_dispatch import TorchDispatchMode

OWNER = "bench"


class CopyCounter(TorchDispatchMode):
    """Bytes written by copying ops (``copy_``, ``clone``, ``cat``, ``stack``, ``_to_copy``) while active."""

    COPIES = ("aten::copy_", "aten::clone", "aten::cat", "aten::stack", "aten::_to_copy")

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.COPIES and isinstance(out, torch.Tensor):
            self.bytes += out.numel() * out.element_size() if func._schema.name != "aten::copy_" else \
                args[1].numel() * out.element_size()
        return out


class _Uncounted:
    """A metric that counts nothing (the turn's commit/rollback counter)."""

    def labels(self, **_: str) -> _Uncounted:
        return self

    def inc(self, *_: float) -> None:
        return None


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors a state (or a turn's checkpoint) holds."""
    out = [t for t in getattr(obj, "S", {}).values() if t is not None]
    out += [t for part in getattr(obj, "extra", {}).values() for t in part.values()]
    out += [t for pair in getattr(obj, "factors", {}).values() for t in pair]
    out += [t for pair in getattr(obj, "kv", None) or [] for t in pair]
    pending = getattr(obj, "pending", None)
    if pending is not None:
        out += list(pending.tensors().values())
    if getattr(obj, "last_logits", None) is not None:
        out.append(obj.last_logits)
    return out


def held_bytes(rt: Any, objects: list[Any]) -> int:
    """Bytes of the distinct storages behind ``objects``' tensors and the runtime's slot slabs."""
    tensors = [t for obj in objects for t in _tensors(obj)]
    pool = rt.slot_pool
    if pool is not None:
        tensors += list(pool.slabs.values()) + [t for pair in pool.factor_slabs.values() for t in pair]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


async def _rounds(rt: Any, sessions: int, prompt: int, steps: int, repeats: int, vocab: int,
                  root: Path) -> dict[str, Any]:
    store = SessionStore(rt.new_state, lambda data: None, SessionFiles(root), budget=1 << 62,
                         max_sessions=sessions, ttl=1e9, persistent=False)
    ctx = SimpleNamespace(store=store, engine=SimpleNamespace(rt=rt), metrics=SimpleNamespace(commits=_Uncounted()),
                          config=SimpleNamespace(auto_create_sessions=False))
    ids = [f"s{i}" for i in range(sessions)]
    for sid in ids:
        await store.create(OWNER, sid=sid)
    gen = torch.Generator().manual_seed(0)

    def step_ids() -> torch.Tensor:
        return torch.randint(0, vocab, (sessions, 1), generator=gen)

    async def turns(commit: bool, first: bool = False) -> dict[str, float]:
        start = time.perf_counter()
        opened = [await open_turn(ctx, OWNER, sid, True) for sid in ids]  # type: ignore[arg-type]
        opened_at = time.perf_counter()
        states = [t.state for t in opened]
        at_open = held_bytes(rt, [s.state for s in store.list(OWNER)] + states
                             + [getattr(t, "checkpoint", None) for t in opened])
        if first:
            rt.forward(torch.randint(0, vocab, (sessions, prompt), generator=gen), states)
        written = states[0].writes
        for _ in range(steps):
            rt.forward(step_ids(), states)
        written = states[0].writes - written
        stepped_at = time.perf_counter()
        holding = held_bytes(rt, [s.state for s in store.list(OWNER)] + states
                             + [getattr(t, "checkpoint", None) for t in opened])
        for t in opened:
            if commit:
                await t.finish(t.state)
            else:
                await t.close()
        ended = time.perf_counter()
        return {"total": ended - start, "open": opened_at - start, "end": ended - stepped_at, "held": holding,
                "held_open": at_open, "writes": written}

    def bare() -> float:
        states = [s.state for s in store.list(OWNER)]
        start = time.perf_counter()
        for _ in range(steps):
            rt.forward(step_ids(), states)
        return time.perf_counter() - start

    async def copied(commit: bool) -> int:
        """Bytes copied by a turn round and the bare round after it, less those of two bare rounds (the same
        steps): the turns' own copies, those a turn leaves to the next call (a slot reloaded) included."""
        with CopyCounter() as in_turns:
            await turns(commit)
            bare()
        with CopyCounter() as in_bare:
            bare()
            bare()
        return in_turns.bytes - in_bare.bytes

    with torch.inference_mode():
        await turns(commit=True, first=True)  # every session reads its prompt and takes a slot
        best: dict[str, dict[str, float]] = {}
        for _ in range(repeats):
            for name, run in (("commit", lambda: turns(True)), ("rollback", lambda: turns(False))):
                got = await run()
                old = best.setdefault(name, got)
                best[name] = {k: (max if k in ("held", "held_open", "writes") else min)(old[k], got[k])
                              for k in got}
                got_bare = bare()
                bare_best = best.setdefault("bare", {"total": got_bare})
                bare_best["total"] = min(bare_best["total"], got_bare)
        copies = {name: await copied(name == "commit") for name in ("commit", "rollback")}
    return {"best": best, "kv_len": store.list(OWNER)[0].state.kv_len, "copied": copies}


def turn_overhead(rt: Any, sessions: int, prompt: int, steps: int, repeats: int, vocab: int) -> list[str]:
    """Lines that report per-turn overhead and memory per active session (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="scale-turns-") as root:
        got = asyncio.run(_rounds(rt, sessions, prompt, steps, repeats, vocab, Path(root)))
    best, bare = got["best"], got["best"]["bare"]["total"]
    lines = [f"B={sessions} sessions, {steps} decode steps a turn (all rows together), KV ~{got['kv_len']} "
             f"positions, {best['commit']['writes']:.0f} chunk writes a turn; min of {repeats} alternating rounds",
             f"bare steps (no turn): {bare / sessions * 1e3:.1f} ms per session"]
    for name in ("commit", "rollback"):
        m = best[name]
        lines.append(f"{name:8s}: overhead {(m['total'] - bare) / sessions * 1e3:7.1f} ms per turn "
                     f"(open {m['open'] / sessions * 1e3:.1f} ms, end {m['end'] / sessions * 1e3:.1f} ms); "
                     f"copied {got['copied'][name] / sessions / 2**20:.1f} MiB per turn; "
                     f"held per session: {m['held_open'] / sessions / 2**20:.0f} MiB at open, "
                     f"{m['held'] / sessions / 2**20:.0f} MiB after the steps")
    return lines
