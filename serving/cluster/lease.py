"""Per-turn session leases on Redis, with an epoch that fences stale writers.

``acquire`` sets ``lease:{key}`` to ``holder:epoch:nonce`` only if no lease exists (``SET NX PX`` in one Lua
script), incrementing ``epoch:{key}`` on every successful acquisition; the token is the fencing value that a
commit must present (see ``state_store``). ``renew`` (compare-and-``PEXPIRE``) runs from a helper thread every
ttl/3, so a CPU-bound model thread starving the event loop does not lose the lease; ``release`` is a
compare-and-delete, never a plain ``DEL``, so a holder whose lease expired cannot free someone else's.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import redis

ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('PTTL', KEYS[1])}
end
local epoch = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. ':' .. epoch .. ':' .. ARGV[2]
redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
return {epoch, token}
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseBusy(Exception):
    """Another holder has the session's lease; ``retry_after_ms`` is what is left of it."""

    def __init__(self, key: str, retry_after_ms: int) -> None:
        super().__init__(f"session {key} is leased by another turn ({retry_after_ms} ms left)")
        self.key = key
        self.retry_after_ms = max(int(retry_after_ms), 0)


class StoreUnavailable(Exception):
    """Redis (or the blob storage) cannot be reached: callers fail closed."""


@dataclass(frozen=True)
class LeaseConfig:
    """``ttl_ms``: lease lifetime; renewed every ``ttl_ms / 3`` while held. ``prefix`` namespaces all keys."""

    ttl_ms: int = 10_000
    prefix: str = "adapt"

    def __post_init__(self) -> None:
        if self.ttl_ms < 30:
            raise ValueError(f"ttl_ms: must be >= 30, got {self.ttl_ms}")
        if not self.prefix or ":" in self.prefix:
            raise ValueError(f"prefix: must be non-empty and contain no ':', got {self.prefix!r}")


@dataclass
class Lease:
    """One held lease. ``lost`` is set when a renewal finds the lease gone (expired or taken)."""

    key: str
    epoch: int
    token: str
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None


class LeaseStore:
    """Acquire, renew and release session leases on one Redis."""

    def __init__(self, client: redis.Redis, holder: str, config: LeaseConfig | None = None) -> None:
        self.client = client
        self.holder = holder
        self.config = config or LeaseConfig()
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    def lease_key(self, key: str) -> str:
        return f"{self.config.prefix}:lease:{key}"

    def epoch_key(self, key: str) -> str:
        return f"{self.config.prefix}:epoch:{key}"

    def acquire(self, key: str, renew: bool = True) -> Lease:
        """Take the lease of ``key`` or raise ``LeaseBusy``; with ``renew`` a thread keeps it alive."""
        nonce = secrets.token_hex(4)
        result = _call(self._acquire, [self.lease_key(key), self.epoch_key(key)],
                       [self.holder, nonce, self.config.ttl_ms])
        epoch, value = int(result[0]), result[1]
        if epoch == 0:
            raise LeaseBusy(key, int(value))
        lease = Lease(key, epoch, value.decode() if isinstance(value, bytes) else str(value))
        if renew:
            lease._thread = threading.Thread(target=self._keep, args=(lease,), daemon=True,
                                             name=f"lease-{key}")
            lease._thread.start()
        return lease

    def renew(self, lease: Lease) -> bool:
        """Extend ``lease`` by a full TTL; False (and ``lease.lost`` set) if it is no longer ours."""
        ok = bool(_call(self._renew, [self.lease_key(lease.key)], [lease.token, self.config.ttl_ms]))
        if not ok:
            lease.lost.set()
        return ok

    def release(self, lease: Lease) -> bool:
        """Stop renewing and delete the lease if it is still ours (compare-and-delete)."""
        lease._stop.set()
        if lease._thread is not None and lease._thread is not threading.current_thread():
            lease._thread.join(timeout=1.0)
        return bool(_call(self._release, [self.lease_key(lease.key)], [lease.token]))

    def holder_of(self, key: str) -> str | None:
        """The token holding ``key`` now, or None."""
        value = _call(self.client.get, self.lease_key(key))
        return None if value is None else value.decode()

    def _keep(self, lease: Lease) -> None:
        period = self.config.ttl_ms / 3000
        while not lease._stop.wait(period):
            try:
                if not self.renew(lease):
                    return
            except StoreUnavailable:
                continue  # keep trying until the TTL runs out; a commit re-checks the token anyway


T = TypeVar("T")


def _call(fn: Callable[..., T], *args: object) -> T:
    try:
        return fn(*args)
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise StoreUnavailable(f"redis is unreachable: {err}") from err
