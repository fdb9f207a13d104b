"""The session store interface: what the edge and turns call on ``ServerContext.store``.

Two implementations: ``local_store.SessionStore`` (one process: memory under a byte budget, spilled to files) and
``cluster_store.ClusterSessionStore`` (every replica: Redis leases, shared blobs, a local cache). A turn
is ``acquire`` (busy, resident; returns the committed state, not to be mutated), ``commit`` (the new state),
``release`` (the turn ends). Errors are domain errors (``failures``): the edge maps them to status codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from adapt_runtime.serving.sessions.local_store import Session

    from adapt_runtime.state import FastWeights


class SessionStoreProtocol(Protocol):
    @property
    def persistent(self) -> bool:
        """Every create and commit is durable (nothing to flush, nothing to delete on shutdown)."""
        ...

    def restore(self) -> int:
        """Register persisted sessions at start-up; the number registered."""
        ...

    def __len__(self) -> int: ...

    def resident_bytes(self) -> int:
        """Bytes of the states held in memory."""
        ...

    def counts(self) -> tuple[int, int]:
        """(resident, not resident) sessions."""
        ...

    def get(self, owner: str, sid: str) -> Session:
        """The session ``sid`` of ``owner``; ``NotFound`` otherwise (another owner's id included)."""
        ...

    def list(self, owner: str) -> Sequence[Session]:
        """The sessions of ``owner``, oldest first."""
        ...

    async def create(self, owner: str, metadata: dict[str, str] | None = None, state: FastWeights | None = None,
                     sid: str | None = None) -> Session:
        """A new session of ``owner`` (a server-made id, or ``sid``), holding ``state`` or a fresh one."""
        ...

    async def acquire(self, session: Session) -> FastWeights:
        """Start a turn (``Conflict`` if one runs); the committed state, which the caller must not mutate."""
        ...

    async def commit(self, session: Session, state: FastWeights, turn: bool = True) -> None:
        """Make ``state`` the session's committed state (the caller holds the turn)."""
        ...

    def release(self, session: Session) -> None:
        """End the turn."""
        ...

    async def delete(self, session: Session) -> None:
        """Delete the session and whatever it stored."""
        ...

    async def fit(self) -> None:
        """Bring resident bytes under the budget."""
        ...

    async def reap(self) -> int:
        """Delete sessions past their TTL; the number deleted."""
        ...

    async def flush(self) -> None:
        """Make every resident session durable (on shutdown)."""
        ...
