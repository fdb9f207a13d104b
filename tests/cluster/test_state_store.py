"""StateStore: immutable blobs plus a fenced compare-and-swap of the head; a stale epoch never commits."""

from __future__ import annotations

import time

import pytest

redis = pytest.importorskip("redis", reason="needs the ray extra: pip install -e '.[ray]'")

from adapt_runtime.serving.cluster.blobs import BlobStore  # noqa: E402
from adapt_runtime.serving.cluster.lease import LeaseConfig, LeaseStore  # noqa: E402
from adapt_runtime.serving.cluster.state_store import CommitRejected, StateStore  # noqa: E402


@pytest.fixture()
def stores(redis_server, tmp_path):
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    leases = LeaseStore(client, "r", LeaseConfig(ttl_ms=200))
    yield leases, StateStore(leases, BlobStore(str(tmp_path / "blobs")), keep_versions=0)
    client.close()


def test_commits_advance_the_head_and_log_linearly(stores):
    leases, states = stores
    assert states.head("o/s") is None
    for turn in range(3):
        lease = leases.acquire("o/s", renew=False)
        base = 0 if states.head("o/s") is None else states.head("o/s").version
        head = states.commit(lease, base, f"state {turn}".encode())
        leases.release(lease)
        assert head.version == turn + 1
        assert states.load("o/s", head) == f"state {turn}".encode()
    log = states.log("o/s")
    assert [(c.base, c.head.version) for c in log] == [(0, 1), (1, 2), (2, 3)]
    assert [c.head.epoch for c in log] == [1, 2, 3]
    assert states.blobs.read_mirror("o/s")["version"] == 3


def test_stale_epoch_cannot_commit(stores):
    leases, states = stores
    stale = leases.acquire("o/s", renew=False)
    time.sleep(0.3)  # paused past its TTL
    fresh = leases.acquire("o/s", renew=False)
    assert states.commit(fresh, 0, b"fresh").version == 1
    with pytest.raises(CommitRejected) as rejected:
        states.commit(stale, 0, b"stale")
    assert rejected.value.reason == "lease_lost"
    assert states.load("o/s", states.head("o/s")) == b"fresh"
    assert len(states.blobs.names("o/s")) == 1, "the rejected blob is removed"


def test_expired_lease_without_a_successor_cannot_commit(stores):
    leases, states = stores
    lease = leases.acquire("o/s", renew=False)
    time.sleep(0.3)
    with pytest.raises(CommitRejected, match="lease_lost"):
        states.commit(lease, 0, b"late")
    assert states.head("o/s") is None


def test_commit_on_an_old_base_is_rejected(stores):
    leases, states = stores
    lease = leases.acquire("o/s", renew=False)
    states.commit(lease, 0, b"one")
    with pytest.raises(CommitRejected) as rejected:
        states.commit(lease, 0, b"again on base 0")
    assert rejected.value.reason == "head_moved"
    assert states.head("o/s").version == 1


def test_garbage_collection_keeps_the_last_versions(redis_server, tmp_path):
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    leases = LeaseStore(client, "r")
    states = StateStore(leases, BlobStore(str(tmp_path / "gc")), keep_versions=2)
    lease = leases.acquire("o/s", renew=False)
    for base in range(5):
        states.commit(lease, base, b"x" * base)
    assert [n[:11] for n in states.blobs.names("o/s")] == ["v0000000004", "v0000000005"]


def test_records_create_once_list_and_delete(stores):
    leases, states = stores
    assert states.create_record("alice", "alice/s1", "s1", {"k": "v"})
    assert not states.create_record("alice", "alice/s1", "s1", {})
    assert states.create_record("alice", "alice/s2", "s2", {})
    assert states.ids("alice") == ["s1", "s2"]
    assert states.ids("bob") == []
    assert states.count() == 2
    assert states.record("alice/s1")["metadata"] == {"k": "v"}
    lease = leases.acquire("alice/s1", renew=False)
    states.commit(lease, 0, b"data")
    assert states.record("alice/s1")["turns"] == 1
    assert states.delete(lease, "alice", "s1")
    assert states.record("alice/s1") is None and states.head("alice/s1") is None
    assert states.ids("alice") == ["s2"]
    assert states.count() == 1
    assert states.blobs.names("alice/s1") == []


def test_memory_url_works_through_fsspec(stores):
    leases, _ = stores
    states = StateStore(leases, BlobStore("memory://adapt-test"), keep_versions=0)
    lease = leases.acquire("o/m", renew=False)
    head = states.commit(lease, 0, b"in memory")
    assert states.load("o/m", head) == b"in memory"
