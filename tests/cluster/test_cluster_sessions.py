"""ClusterSessionStore (two stores = two replicas on one Redis and one blob directory): the cache is used only
while its version is the head's, busy and fenced turns answer 409, Redis down answers 503, the cache is bounded."""

from __future__ import annotations

import asyncio

import pytest

redis = pytest.importorskip("redis", reason="needs the ray extra: pip install -e '.[ray]'")

from adapt_runtime.serving.cluster.blobs import BlobStore  # noqa: E402
from adapt_runtime.serving.cluster.lease import LeaseConfig, LeaseStore  # noqa: E402
from adapt_runtime.serving.cluster.state_store import StateStore  # noqa: E402
from adapt_runtime.serving.edge.errors import http_error  # noqa: E402
from adapt_runtime.serving.failures import ServingError  # noqa: E402
from adapt_runtime.serving.sessions.cluster_store import ClusterSessionStore  # noqa: E402


class Blob:
    """A stand-in state: bytes in, bytes out."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.nbytes = len(data)

    def to_bytes(self) -> bytes:
        return self.data


def make_store(url: str, folder, holder: str, events: list[str], budget: int = 2**20,
               ttl_ms: int = 5000, quota: int | None = None) -> ClusterSessionStore:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=0.5)
    states = StateStore(LeaseStore(client, holder, LeaseConfig(ttl_ms=ttl_ms)), BlobStore(str(folder)))
    return ClusterSessionStore(states, Blob, Blob, budget, max_sessions=100, on_event=events.append,
                               max_per_owner=quota)


@pytest.fixture()
def pair(redis_server, tmp_path):
    redis.Redis.from_url(redis_server.url).flushdb()
    events_a, events_b = [], []
    a = make_store(redis_server.url, tmp_path, "replica-a", events_a)
    b = make_store(redis_server.url, tmp_path, "replica-b", events_b)
    return a, b, events_a, events_b


async def turn(store: ClusterSessionStore, sid: str, data: bytes) -> bytes:
    session = store.get("o", sid)
    before = await store.acquire(session)
    try:
        await store.commit(session, Blob(data))
    finally:
        store.release(session)
    return before.data


def test_a_cached_state_is_used_only_while_it_is_the_head(pair):
    a, b, events_a, _ = pair

    async def run() -> list[bytes]:
        await a.create("o", sid="s")
        seen = [await turn(a, "s", b"one")]
        seen.append(await turn(a, "s", b"two"))  # A's cache is the head: a hit
        seen.append(await turn(b, "s", b"three"))  # B loads the blob
        seen.append(await turn(a, "s", b"four"))  # A's cache is stale: it must load B's commit
        return seen

    assert asyncio.run(run()) == [b"", b"one", b"two", b"three"]
    assert events_a.count("cache_hit") == 1 and events_a.count("loaded") == 1
    assert a.get("o", "s").record.turns == 4


def test_busy_session_is_409_with_retry_after(pair):
    a, b, _, _ = pair

    async def run() -> ServingError:
        await a.create("o", sid="s")
        held = a.get("o", "s")
        await a.acquire(held)
        try:
            with pytest.raises(ServingError) as busy:
                await b.acquire(b.get("o", "s"))
            assert b.get("o", "s").busy
        finally:
            a.release(held)
        await turn(b, "s", b"after")
        return busy.value

    err = http_error(asyncio.run(run()))
    assert (err.status, err.code) == (409, "session_busy")
    assert 1 <= int(err.headers["Retry-After"]) <= 5


def test_a_turn_whose_lease_was_lost_keeps_nothing(pair):
    a, _, _, _ = pair

    async def run() -> ServingError:
        await a.create("o", sid="s")
        session = a.get("o", "s")
        await a.acquire(session)
        a.states.client.delete(a.leases.lease_key("o/s"))  # expired and gone
        with pytest.raises(ServingError) as lost:
            await a.commit(session, Blob(b"late"))
        a.release(session)
        return lost.value

    err = http_error(asyncio.run(run()))
    assert (err.status, err.code) == (409, "session_lease_lost")
    assert a.states.head("o/s") is None


def test_redis_down_is_503(tmp_path):
    store = make_store("redis://127.0.0.1:1/0", tmp_path, "r", [])
    with pytest.raises(ServingError) as down:
        store.get("o", "s")
    assert (http_error(down.value).status, down.value.code) == (503, "session_store_unavailable")
    assert http_error(down.value).headers["Retry-After"] == "1"


def test_the_cache_stays_within_its_budget(redis_server, tmp_path):
    redis.Redis.from_url(redis_server.url).flushdb()
    events: list[str] = []
    store = make_store(redis_server.url, tmp_path, "r", events, budget=250)

    async def run() -> None:
        for i in range(4):
            await store.create("o", sid=f"s{i}")
            await turn(store, f"s{i}", bytes(100))

    asyncio.run(run())
    assert store.resident_bytes() == 200
    assert store.counts() == (2, 2)
    assert events.count("evicted") == 2


def test_a_key_beyond_its_quota_is_429(redis_server, tmp_path):
    redis.Redis.from_url(redis_server.url).flushdb()
    store = make_store(redis_server.url, tmp_path, "r", [], quota=2)

    async def run() -> ServingError:
        await store.create("o", sid="s1")
        await store.create("o", sid="s2")
        await store.create("other", sid="s1")
        with pytest.raises(ServingError) as full:
            await store.create("o", sid="s3")
        return full.value

    err = http_error(asyncio.run(run()))
    assert (err.status, err.code) == (429, "session_quota_reached")
