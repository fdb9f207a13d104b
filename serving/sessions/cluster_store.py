"""ClusterSessionStore: today's SessionStore interface over leases, the shared state store and a byte-bounded cache.

The app (routes, turns, generation) is unchanged: ``acquire`` takes the session's Redis lease (409 ``session_busy``
with Retry-After when another turn holds it, 503 when Redis is down: fail closed) and reads the committed head,
from this replica's cache when the cached version is the head's, else from the blob store; ``commit`` writes a new
blob and moves the head under the lease (a fenced-off writer gets 409 ``session_lease_lost`` and nothing is kept);
``release`` frees the lease. No lease is held between turns, so any replica can serve any session: routing only
decides where the cache is warm. The cache holds committed states only, so evicting one just drops memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from adapt_runtime.serving.cluster.lease import Lease, LeaseBusy, StoreUnavailable
from adapt_runtime.serving.cluster.state_store import CommitRejected, StateStore
from adapt_runtime.serving.failures import Conflict, LimitReached, NotFound, Unavailable
from adapt_runtime.serving.sessions.files import SessionRecord
from adapt_runtime.serving.sessions.local_store import Session, check_session_id, new_session_id

if TYPE_CHECKING:
    from adapt_runtime.state import FastWeights

T = TypeVar("T")

log = logging.getLogger("adapt_serve")


@dataclass(eq=False)
class ClusterSession(Session):
    key: str = ""
    lease: Lease | None = None
    base: int = 0


def _own(session: Session) -> ClusterSession:
    """A session this store made (the interface passes ``Session``; every one given back came from ``get``)."""
    return cast(ClusterSession, session)


def unavailable(err: Exception) -> Unavailable:
    log.warning("session store unavailable: %s", err)
    return Unavailable("the session store is unavailable; retry shortly", "session_store_unavailable")


class ClusterSessionStore:
    """Sessions of every principal, shared by all replicas (a ``SessionStoreProtocol``, as ``SessionStore`` is)."""

    persistent = True

    def __init__(self, states: StateStore, new_state: Callable[[], FastWeights],
                 load_state: Callable[[bytes], FastWeights], budget: int, max_sessions: int,
                 on_event: Callable[[str], None] | None = None, max_per_owner: int | None = None) -> None:
        self.states = states
        self.leases = states.leases
        self._new_state = new_state
        self._load_state = load_state
        self.budget = budget
        self.max_sessions = max_sessions
        self.max_per_owner = max_per_owner or max_sessions
        self._on_event = on_event or (lambda _: None)
        self._cache: OrderedDict[str, tuple[int, FastWeights]] = OrderedDict()

    # what the app reads -----------------------------------------------------------------------------------

    def restore(self) -> int:
        return 0

    def __len__(self) -> int:
        return self._guard(self.states.count)

    def resident_bytes(self) -> int:
        return sum(state.nbytes for _, state in self._cache.values())

    def counts(self) -> tuple[int, int]:
        try:
            total = self.states.count()
        except StoreUnavailable:
            total = len(self._cache)
        return len(self._cache), max(total - len(self._cache), 0)

    def get(self, owner: str, sid: str) -> ClusterSession:
        check_session_id(sid)
        key = f"{owner}/{sid}"
        record = self._guard(self.states.record, key)
        if record is None or record["owner"] != owner:
            raise NotFound(f"session {sid} not found", "session_not_found", "session_id")
        rec = SessionRecord(sid, owner, record["created_at"], record["last_used"], record["turns"],
                            record["metadata"])
        busy = self._guard(self.leases.holder_of, key) is not None
        cached = self._cache.get(key)
        return ClusterSession(rec, cached[1] if cached else None, busy=busy, key=key)

    def list(self, owner: str) -> list[ClusterSession]:
        sessions = []
        for sid in self._guard(self.states.ids, owner):
            with contextlib.suppress(NotFound):  # deleted since the listing
                sessions.append(self.get(owner, sid))
        return sorted(sessions, key=lambda s: s.record.created_at)

    # life cycle -------------------------------------------------------------------------------------------

    async def create(self, owner: str, metadata: dict[str, str] | None = None, state: FastWeights | None = None,
                     sid: str | None = None) -> ClusterSession:
        sid = sid or new_session_id()
        key = f"{owner}/{sid}"
        if self._guard(self.states.count) >= self.max_sessions:
            raise LimitReached(f"the cluster holds its maximum of {self.max_sessions} sessions; delete some",
                               "session_limit_reached", retry_after=5)
        if len(self._guard(self.states.ids, owner)) >= self.max_per_owner:  # checked, not reserved: approximate
            raise LimitReached(f"this API key holds its quota of {self.max_per_owner} sessions; delete some",
                               "session_quota_reached", retry_after=5)
        if self._guard(self.states.create_record, owner, key, sid, dict(metadata or {})):
            self._on_event("created")
        session = self.get(owner, sid)
        if state is not None:
            await self.acquire(session)
            try:
                await self.commit(session, state, turn=False)
            finally:
                self.release(session)
        return session

    async def acquire(self, session: Session) -> FastWeights:
        """Take the session's lease and return its committed state (a turn changes it in place under a checkpoint
        and puts it back when it does not commit, so the cache holds committed states only)."""
        session = _own(session)
        try:
            lease = self.leases.acquire(session.key)
        except LeaseBusy as busy:
            self._on_event("busy")
            wait = max(1, math.ceil(busy.retry_after_ms / 1000))
            raise Conflict(f"session {session.id} is in another turn; retry when it finishes",
                           "session_busy", "session_id", retry_after=wait) from None
        except StoreUnavailable as err:
            raise unavailable(err) from None
        try:
            head = self.states.head(session.key)
            version = 0 if head is None else head.version
            cached = self._cache.get(session.key)
            # a cached state that a turn still changes (its lease lapsed mid-turn) is not the head's: read the blob
            if cached is not None and cached[0] == version and getattr(cached[1], "checkpoint", None) is None:
                state = cached[1]
                self._cache.move_to_end(session.key)
                self._on_event("cache_hit")
            elif head is None:
                state = self._new_state()
            else:
                data = await asyncio.to_thread(self.states.load, session.key, head)
                state = self._load_state(data)
                self._on_event("loaded")
        except StoreUnavailable as err:
            self._free(lease)
            raise unavailable(err) from None
        except BaseException:
            self._free(lease)
            raise
        session.lease, session.base, session.state, session.busy = lease, version, state, True
        return state

    async def commit(self, session: Session, state: FastWeights, turn: bool = True) -> None:
        """Make ``state`` the session's head (fenced by the lease taken in ``acquire``)."""
        session = _own(session)
        lease = session.lease
        if lease is None:
            raise RuntimeError("commit without acquire")
        data = await asyncio.to_thread(state.to_bytes)
        try:
            head = await asyncio.to_thread(self.states.commit, lease, session.base, data, turn)
        except CommitRejected as err:
            self._on_event(f"commit_rejected_{err.reason}")
            raise Conflict(f"session {session.id} lost its lease before the commit; nothing of this turn "
                           "was kept", "session_lease_lost", "session_id", retry_after=1) from None
        except StoreUnavailable as err:
            raise unavailable(err) from None
        session.base, session.state = head.version, state
        session.record.turns += int(turn)
        self._cache[session.key] = (head.version, state)
        self._cache.move_to_end(session.key)

    def release(self, session: Session) -> None:
        session = _own(session)
        if session.lease is not None:
            self._free(session.lease)
            session.lease = None
        session.busy = False
        self._fit()

    async def delete(self, session: Session) -> None:
        session = _own(session)
        await self.acquire(session)
        try:
            self._guard(self.states.delete, session.lease, session.record.owner, session.id)
            self._cache.pop(session.key, None)
            self._on_event("deleted_api")
        finally:
            self.release(session)

    async def fit(self) -> None:
        self._fit()

    async def reap(self) -> int:
        return 0  # sessions have no TTL in cluster mode: delete them through the API

    async def flush(self) -> None:
        return None  # every commit is durable already

    # helpers ----------------------------------------------------------------------------------------------

    def _fit(self) -> None:
        while self._cache and self.resident_bytes() > self.budget:
            self._cache.popitem(last=False)
            self._on_event("evicted")

    def _free(self, lease: Lease) -> None:
        try:
            self.leases.release(lease)
        except StoreUnavailable as err:
            log.warning("lease of %s not released (it expires by itself): %s", lease.key, err)

    def _guard(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except StoreUnavailable as err:
            raise unavailable(err) from None
