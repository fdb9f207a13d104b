"""SessionStore: the sessions of all principals, resident under a byte budget, the rest on disk.

Sessions live in one namespace per principal (API-key hash): the store is keyed by (principal, id), so a
client-chosen id such as ``alice`` never collides across keys, and another principal asking for an id gets 404
exactly as for an id that does not exist. One turn at a time: ``acquire`` marks the session busy (409
otherwise) and makes it resident; ``commit`` keeps the turn's state (the session's own, changed in place);
``release`` ends the turn. The
least recently used idle sessions are written to disk (the runtime's state file) when resident bytes exceed
the budget, and read back on their next use. With ``persistent`` on (an explicit ``--session-dir``), every
create and commit is written through, so a restart finds every session. Sessions idle for longer than the TTL
are deleted, files included. All methods run on the event loop; file I/O goes to a thread under the session's
I/O lock, one lock per (owner, id) even across a deleted session and its re-created namesake.

Durability and deletion: ``commit`` changes memory only after the write-through succeeded (a failed write is a
503 with the previous turn still committed, in memory and on disk). A deleted session is a tombstone: a turn
queued behind the DELETE gets 404, nothing writes its files again, and whoever holds its I/O lock when it is
dropped (an eviction, a flush) removes its files before letting go.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from adapt_runtime.serving.failures import Conflict, InvalidRequest, LimitReached, NotFound, Unavailable
from adapt_runtime.serving.sessions.files import SESSION_ID, STAT_FIELDS, SessionFiles, SessionRecord, state_stats
from adapt_runtime.serving.types import JsonObject

if TYPE_CHECKING:
    from adapt_runtime.state import FastWeights

log = logging.getLogger("adapt_serve")


@dataclass(eq=False)
class Session:
    record: SessionRecord
    state: FastWeights | None  # None while it lives only on disk
    busy: bool = False
    io: asyncio.Lock = field(default_factory=asyncio.Lock)  # shared by every Session object of one (owner, id)
    deleted: bool = False  # a tombstone: dropped from the store, nothing of it is written again
    queued: bool = False  # a turn marked it busy and waits for its I/O lock (a DELETE ahead of it still wins)

    @property
    def id(self) -> str:
        return self.record.id

    def info(self) -> JsonObject:
        """The session as ``GET /v1/sessions/{id}`` reports it: the same fields whether it is resident or on disk
        only (after a restart every session is). ``tokens_seen``, ``kv_len``, ``writes``, ``refused_writes`` and
        ``bytes`` come from the state when resident, else from the sidecar written with the state file; they are
        null only for a session whose sidecar predates them (until its state is next loaded)."""
        state = self.state
        body = {
            "id": self.id,
            "object": "session",
            "created_at": int(self.record.created_at),
            "last_used_at": int(self.record.last_used),
            "turns": self.record.turns,
            "metadata": dict(self.record.metadata),
            "resident": state is not None,
            "busy": self.busy,
        }
        # a state in a turn is described as committed (its checkpoint), as the turn may still roll back
        committed = None if state is None else getattr(state, "checkpoint", None) or state
        stats = state_stats(committed) if committed is not None else self.record.stats
        body.update(stats or dict.fromkeys(STAT_FIELDS))
        return body


def new_session_id() -> str:
    return "sess_" + secrets.token_urlsafe(18)


def check_session_id(sid: str) -> str:
    if not SESSION_ID.fullmatch(sid):  # fullmatch: "$" alone would accept "id\n"
        raise InvalidRequest("a session id is 1-128 characters of [A-Za-z0-9_.:-], starting with a letter or digit",
                             "invalid_session_id", "session_id")
    return sid


class SessionStore:
    def __init__(self, new_state: Callable[[], FastWeights], load_state: Callable[[bytes], FastWeights],
                 files: SessionFiles, budget: int, max_sessions: int, ttl: float, persistent: bool,
                 on_event: Callable[[str], None] | None = None, max_per_owner: int | None = None) -> None:
        self._new_state = new_state
        self._load_state = load_state
        self.files = files
        self.budget = budget
        self.max_sessions = max_sessions
        self.max_per_owner = max_per_owner or max_sessions
        self.ttl = ttl
        self.persistent = persistent
        self._on_event = on_event or (lambda _: None)
        self._sessions: dict[tuple[str, str], Session] = {}
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        self._fitting: asyncio.Task | None = None

    def restore(self) -> int:
        """Register every session persisted in the directory, client-named ids included (state stays on disk
        until used)."""
        for record in self.files.scan():
            self._sessions[(record.owner, record.id)] = self._session(record, None)
        return len(self._sessions)

    def _session(self, record: SessionRecord, state: FastWeights | None) -> Session:
        key = (record.owner, record.id)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return Session(record, state, io=lock)

    @contextlib.asynccontextmanager
    async def _io(self, session: Session) -> AsyncIterator[None]:
        """Hold the session's I/O lock; a session dropped meanwhile has its files removed before the lock goes."""
        async with session.io:
            try:
                yield
            finally:
                if session.deleted:
                    self.files.remove(session.record)

    def __len__(self) -> int:
        return len(self._sessions)

    def resident_bytes(self) -> int:
        return sum(s.state.nbytes for s in self._sessions.values() if s.state is not None)

    def counts(self) -> tuple[int, int]:
        resident = sum(1 for s in self._sessions.values() if s.state is not None)
        return resident, len(self._sessions) - resident

    async def create(self, owner: str, metadata: dict[str, str] | None = None, state: FastWeights | None = None,
                     sid: str | None = None) -> Session:
        """A new session of ``owner``: a server-made id, or ``sid`` (409 if another request made it meanwhile)."""
        if len(self._sessions) >= self.max_sessions:
            await self.reap()
        if sid is not None and (owner, sid) in self._sessions:
            raise Conflict(f"session {sid} was just created by another request; retry", "session_busy",
                           "session_id", retry_after=1)
        if len(self._sessions) >= self.max_sessions:
            raise LimitReached(f"the server holds its maximum of {self.max_sessions} sessions; delete some",
                               "session_limit_reached", retry_after=5)
        if sum(1 for s in self._sessions.values() if s.record.owner == owner) >= self.max_per_owner:
            raise LimitReached(f"this API key holds its quota of {self.max_per_owner} sessions; delete some",
                               "session_quota_reached", retry_after=5)
        now = time.time()
        record = SessionRecord(sid or new_session_id(), owner, now, now, 0, dict(metadata or {}))
        fresh = state if state is not None else self._new_state()
        session = self._session(record, fresh)
        self._sessions[(owner, record.id)] = session
        if self.persistent:
            try:
                await self._write(session, session.record, fresh)
            except BaseException:
                self._drop(session, None)
                raise
        self._on_event("created")
        await self.fit()
        return session

    def get(self, owner: str, sid: str) -> Session:
        check_session_id(sid)
        session = self._sessions.get((owner, sid))
        if session is not None and not session.busy and self._expired(session):
            self._drop(session, "ttl")
            session = None
        if session is None:
            raise NotFound(f"session {sid} not found", "session_not_found", "session_id")
        return session

    def list(self, owner: str) -> list[Session]:
        mine = [s for s in self._sessions.values() if s.record.owner == owner and not self._expired(s)]
        return sorted(mine, key=lambda s: s.record.created_at)

    async def acquire(self, session: Session) -> FastWeights:
        """Start a turn: busy (409 if already), resident; returns the committed state (a turn changes it in place
        under a checkpoint, ``serving.turn``)."""
        if session.busy:
            self._on_event("busy")
            raise Conflict(f"session {session.id} is in another turn; retry when it finishes",
                           "session_busy", "session_id", retry_after=1)
        session.busy = session.queued = True
        try:
            async with self._io(session):
                session.queued = False
                if session.deleted:
                    raise NotFound(f"session {session.id} was deleted", "session_not_found", "session_id")
                if session.state is None:
                    session.state = await asyncio.to_thread(self._read, session.record)
        except BaseException:
            session.busy = session.queued = False
            raise
        session.record.last_used = time.time()
        return session.state

    async def commit(self, session: Session, state: FastWeights, turn: bool = True) -> None:
        """Make ``state`` the session's state (the caller holds the turn). With write-through, memory changes
        only once the files are durable: a failed write raises 503 and the previous commit stays, so a retry
        applies the turn once and a restart never reverts an acknowledged one."""
        record = dataclasses.replace(session.record, last_used=time.time(), turns=session.record.turns + int(turn))
        if not self.persistent:
            session.state, session.record = state, record
            return
        # shielded: a caller cancelled mid-write (a client gone) cannot leave the disk ahead of memory
        write = asyncio.ensure_future(self._write(session, record, state))
        write.add_done_callback(lambda task: task.cancelled() or task.exception())
        await asyncio.shield(write)

    def release(self, session: Session) -> None:
        """End a turn; spilling, if the budget needs it, runs as a background task."""
        session.busy = False
        session.record.last_used = time.time()
        if self.resident_bytes() > self.budget and (self._fitting is None or self._fitting.done()):
            self._fitting = asyncio.get_running_loop().create_task(self.fit())

    async def delete(self, session: Session) -> None:
        """Delete a session and its files. A turn queued behind the DELETE gets 404 and writes nothing back."""
        busy = Conflict(f"session {session.id} is in a turn; delete it when the turn ends",
                        "session_busy", "session_id", retry_after=1)
        if session.busy and not session.queued:
            raise busy
        async with self._io(session):
            if session.deleted:
                raise NotFound(f"session {session.id} not found", "session_not_found", "session_id")
            if session.busy and not session.queued:  # a turn took the lock first and runs now
                raise busy
            self._drop(session, "api")

    async def fit(self) -> None:
        """Spill least recently used idle sessions to disk until resident bytes fit the budget."""
        while self.resident_bytes() > self.budget:
            idle = [s for s in self._sessions.values() if s.state is not None and not s.busy and not s.io.locked()]
            if not idle:
                return
            victim = min(idle, key=lambda s: s.record.last_used)
            spilled = victim.state
            async with self._io(victim):
                if not victim.deleted and spilled is not None:  # resident: chosen among states not None
                    try:
                        victim.record = await asyncio.to_thread(self.files.write, victim.record, spilled)
                    except OSError as err:
                        log.warning("cannot spill session %s to disk (%s); it stays in memory", victim.id, err)
                        return
                victim.state = None
            self._on_event("evicted")

    async def reap(self) -> int:
        """Delete sessions idle for longer than the TTL."""
        expired = [s for s in self._sessions.values() if not s.busy and self._expired(s)]
        dropped = 0
        for session in expired:
            async with self._io(session):
                if not (session.busy or session.deleted) and self._expired(session):  # still, under the lock
                    self._drop(session, "ttl")
                    dropped += 1
        return dropped

    async def flush(self) -> None:
        """Write every resident session to disk (on shutdown when persistent). A session in a turn is left as its
        last commit wrote it (the turn changes its state in place and may still roll back)."""
        for session in list(self._sessions.values()):
            if session.state is not None and not session.deleted and not session.busy:
                async with self._io(session):
                    if not session.deleted:
                        session.record = await asyncio.to_thread(self.files.write, session.record, session.state)

    def _expired(self, session: Session) -> bool:
        return time.time() - session.record.last_used > self.ttl

    def _drop(self, session: Session, reason: str | None) -> None:
        """Tombstone and unregister ``session``; its files go now, or when the holder of its I/O lock lets go."""
        if session.deleted:
            return
        session.deleted = True
        key = (session.record.owner, session.id)
        if self._sessions.get(key) is session:
            del self._sessions[key]
        if not session.io.locked():
            self.files.remove(session.record)
        if reason is not None:
            self._on_event(f"deleted_{reason}")

    async def _write(self, session: Session, record: SessionRecord, state: FastWeights) -> None:
        """Write ``state`` with ``record`` as one commit, then make them the session's, under its I/O lock
        (404 for a deleted session, 503 when the write fails: then nothing changes)."""
        async with self._io(session):
            if session.deleted:
                raise NotFound(f"session {session.id} was deleted", "session_not_found", "session_id")
            try:
                new = await asyncio.to_thread(self.files.write, record, state)
            except OSError as err:
                log.warning("cannot write session %s: %s", session.id, err)
                raise Unavailable(f"session {session.id} could not be saved ({err.strerror or err}); "
                                  "nothing of this request was kept", "session_write_failed") from None
            session.state, session.record = state, new

    def _read(self, record: SessionRecord) -> FastWeights:
        if not self.files.has_state(record):
            return self._new_state()
        return self._load_state(self.files.read_state(record))
