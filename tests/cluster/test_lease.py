"""LeaseStore against a real redis-server: exclusive acquire, increasing epochs, renewal, compare-and-delete."""

from __future__ import annotations

import time

import pytest

redis = pytest.importorskip("redis", reason="needs the ray extra: pip install -e '.[ray]'")

from adapt_runtime.serving.cluster.lease import LeaseBusy, LeaseConfig, LeaseStore, StoreUnavailable  # noqa: E402


@pytest.fixture()
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    c.flushdb()
    yield c
    c.close()


def test_acquire_is_exclusive_and_epochs_increase(client):
    a = LeaseStore(client, "replica-a", LeaseConfig(ttl_ms=5000))
    b = LeaseStore(client, "replica-b", LeaseConfig(ttl_ms=5000))
    first = a.acquire("alice/s1", renew=False)
    assert first.epoch == 1
    assert first.token.startswith("replica-a:1:")
    with pytest.raises(LeaseBusy) as busy:
        b.acquire("alice/s1", renew=False)
    assert 0 < busy.value.retry_after_ms <= 5000
    assert a.release(first)
    second = b.acquire("alice/s1", renew=False)
    assert second.epoch == 2
    other = a.acquire("alice/s2", renew=False)
    assert other.epoch == 1


def test_expired_lease_can_be_taken_and_old_holder_cannot_release_it(client):
    store = LeaseStore(client, "r", LeaseConfig(ttl_ms=100))
    old = store.acquire("k", renew=False)
    time.sleep(0.25)
    new = store.acquire("k", renew=False)
    assert new.epoch == old.epoch + 1
    assert not store.release(old)
    assert store.holder_of("k") == new.token
    assert not store.renew(old)
    assert old.lost.is_set()


def test_renewal_thread_keeps_the_lease_past_its_ttl(client):
    store = LeaseStore(client, "r", LeaseConfig(ttl_ms=150))
    lease = store.acquire("k")
    time.sleep(0.6)
    assert store.holder_of("k") == lease.token
    assert not lease.lost.is_set()
    assert store.release(lease)
    assert store.holder_of("k") is None


def test_renewal_notices_a_lost_lease(client):
    store = LeaseStore(client, "r", LeaseConfig(ttl_ms=150))
    lease = store.acquire("k")
    client.delete(store.lease_key("k"))
    assert lease.lost.wait(1.0)
    store.release(lease)


def test_unreachable_redis_raises_store_unavailable():
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        LeaseStore(client, "r").acquire("k", renew=False)


def test_config_is_validated():
    with pytest.raises(ValueError, match="ttl_ms"):
        LeaseConfig(ttl_ms=1)
    with pytest.raises(ValueError, match="prefix"):
        LeaseConfig(prefix="a:b")
