"""Turn: one inference request's hold on its session, or on a throwaway state when it names none.

A turn works on the session's own state, in place: opening it takes a ``Checkpoint`` of the committed point
(``adapt_runtime.checkpoint``: no tensor copied; S and the rule's extra tensors are copied on their first write,
the KV cache is only ever appended to). ``finish`` commits the state (unless the request said ``"adapt": false``)
and ends the turn; ``close`` ends it without committing, which is the rollback for errors, disconnects, refused
commits and ``"adapt": false``: the checkpoint puts S, the KV cache, the tokens, the pending chunk, the counters
and the last logits back bit for bit. So an active session holds one state and one slot, and a turn copies
neither its S nor its KV to start. The model thread has let go of the state before ``close`` runs: every caller
closes the engine's event stream first, and ``Engine.run`` returns only once the scheduler holds the job no more.

An unknown session id (with ``--auto-create-sessions``) is created only for a request that will run and write:
``start_turn`` plans the request on a fresh state first and creates the session after the plan was accepted, so
a refused request leaves no session, no file and no quota use. An ``"adapt": false`` request on an unknown id
runs on a fresh state (the unknown session's memory is empty), names the id in its response, and creates nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from adapt_runtime.serving.context import ServerContext
from adapt_runtime.serving.failures import NotFound
from adapt_runtime.serving.sessions.local_store import Session
from adapt_runtime.serving.types import JsonObject

from adapt_runtime.checkpoint import Checkpoint

if TYPE_CHECKING:
    from adapt_runtime.serving.engine.scheduler import Scheduler

    from adapt_runtime.state import FastWeights

T = TypeVar("T")

class Turn:
    def __init__(self, ctx: ServerContext, session: Session | None, state: FastWeights, adapt: bool,
                 unknown: tuple[str, str] | None = None) -> None:
        """``unknown``: (owner, id) of a session that does not exist yet (``claim`` creates it)."""
        self.ctx = ctx
        self.session = session
        self.state = state
        self.adapt = adapt
        self.committed = False
        self.unknown = unknown
        self._open = session is not None
        # the committed point of a session's own state (None: a fresh state nothing else holds)
        self.checkpoint = Checkpoint(state) if session is not None else None
        self._ending: asyncio.Task | None = None  # a rollback waiting for the model thread to let go

    @property
    def session_id(self) -> str | None:
        """The session the request named (one not created, for an ``"adapt": false`` request, included)."""
        if self.session is not None:
            return self.session.id
        return None if self.unknown is None else self.unknown[1]

    async def claim(self) -> None:
        """Create the unknown session this turn will commit to, and take it, keeping the planned working state (a
        fresh one, as the new session's is). Nothing to do for a known session or an ``"adapt": false`` turn."""
        if self.unknown is None or not self.adapt:
            return
        owner, sid = self.unknown
        session = await self.ctx.store.create(owner, sid=sid)
        await self.ctx.store.acquire(session)
        self.session, self.unknown, self._open = session, None, True

    async def finish(self, final_state: FastWeights) -> None:
        """The turn completed: commit its state (when adapting) and free the session."""
        if self.session is not None and self.adapt and self._open:
            await self.ctx.store.commit(self.session, final_state)
            self.committed = True
            if self.checkpoint is not None:
                self.checkpoint.release()
            self.ctx.metrics.commits.labels(outcome="commit").inc()
        await self.close()

    async def close(self) -> None:
        """Free the session; without a prior ``finish`` nothing of this turn is kept. A rollback waits until the
        model thread lets go of the state (a job cancelled mid-step), in a task of its own, so that a caller whose
        own await is cancelled (a client gone) cannot cut it short; the session stays busy until then."""
        if self._open and self.session is not None:
            self._open = False
            scheduler = getattr(self.ctx.engine, "scheduler", None)
            if not self.committed and scheduler is not None and scheduler.holds(self.state):
                self._ending = asyncio.get_running_loop().create_task(self._end_when_free(scheduler))
                return
            self._end()

    async def _end_when_free(self, scheduler: Scheduler) -> None:
        while scheduler.holds(self.state):
            await asyncio.sleep(0.001)
        self._end()

    def _end(self) -> None:
        if not self.committed and self.checkpoint is not None:
            self.checkpoint.restore()
        if not self.committed and self.adapt:
            self.ctx.metrics.commits.labels(outcome="rollback").inc()
        if self.session is not None:
            self.ctx.store.release(self.session)

    def adaptation(self, final_state: FastWeights | None) -> JsonObject:
        state = final_state if final_state is not None else self.state
        return {"committed": self.committed, "tokens_seen": state.tokens_seen, "writes": state.writes,
                "refused_writes": state.refused_writes}


async def open_turn(ctx: ServerContext, owner: str, sid: str | None, adapt: bool) -> Turn:
    """Take the turn on session ``sid`` of ``owner`` (None: a throwaway state); 409 if the session is in another
    turn. An unknown id is 404 without ``--auto-create-sessions``; with it (the default), the turn holds a fresh
    state and the id, and ``claim`` creates the session in the owner's namespace."""
    if sid is None:
        return Turn(ctx, None, ctx.engine.rt.new_state(), adapt)
    try:
        session = ctx.store.get(owner, sid)
    except NotFound:
        if not ctx.config.auto_create_sessions:
            raise
        return Turn(ctx, None, ctx.engine.rt.new_state(), adapt, unknown=(owner, sid))  # created by ``claim``
    committed = await ctx.store.acquire(session)
    try:
        return Turn(ctx, session, committed, adapt)
    except BaseException:
        ctx.store.release(session)
        raise


async def start_turn(ctx: ServerContext, owner: str, sid: str | None, adapt: bool,
                     plan: Callable[[Turn], T]) -> tuple[Turn, T]:
    """Admit a request, open its turn, plan its work with ``plan(turn)``, then create the session the turn
    names if it is new (so a plan that refuses the request creates nothing); if any step fails, what was taken
    is given back (the turn closed, the admission left) before the error propagates."""
    ctx.admit()
    try:
        turn = await open_turn(ctx, owner, sid, adapt)
    except BaseException:
        ctx.leave()
        raise
    try:
        planned = plan(turn)
        await turn.claim()
        return turn, planned
    except BaseException:
        await turn.close()
        ctx.leave()
        raise
