"""adapt-serve on Ray Serve, 2 engine replicas + 1 ingress: replica header, affinity, 409s, session routes,
fencing and Redis down/up. One cluster for the module (starting it costs ~30 s on 2 cores)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
pytest.importorskip("redis", reason="needs the ray extra: pip install -e '.[ray]'")

import httpx  # noqa: E402
from adapt_runtime.serving.cluster.lease import LeaseConfig, LeaseStore  # noqa: E402
from adapt_runtime.serving.cluster.state_store import CommitRejected  # noqa: E402
from adapt_runtime.serving.edge.guard import ApiKeys  # noqa: E402
from cluster_testing import Cluster  # noqa: E402
from oracle import History, Replay, check  # noqa: E402

KEY_A, KEY_B = "key-a-cluster", "key-b-cluster"
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture(scope="module")
def cluster(ray_runtime, redis_server, tmp_path_factory):
    c = Cluster(ray_runtime, tmp_path_factory.mktemp("cluster"), redis_server, api_keys=(KEY_A, KEY_B))
    c.client.headers.update(AUTH_A)
    yield c
    c.close()


def test_every_response_names_its_engine_replica(cluster):
    responses = [
        cluster.client.get("/health"),
        cluster.client.get("/v1/models"),
        cluster.turn("hdr-1"),
        cluster.client.get("/v1/sessions/does-not-exist"),
        cluster.client.get("/v1/models", headers={"Authorization": "Bearer wrong"}),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 404, 401]
    live = set(cluster.replica_actors())
    for response in responses:
        assert response.headers["x-replica-id"] in live


def test_turns_of_a_session_stay_on_one_replica_by_header_or_body(cluster):
    where: dict[str, set[str]] = {}
    for turn in range(3):
        for n in range(10):
            sid = f"aff-{n}"
            response = cluster.turn(sid, prompt=f"Turn {turn} of {sid}.", via="header" if turn % 2 else "body")
            assert response.status_code == 200, response.text
            assert response.json()["session_id"] == sid
            where.setdefault(sid, set()).add(response.headers["x-replica-id"])
    assert all(len(replicas) == 1 for replicas in where.values()), where
    assert len(set().union(*where.values())) == 2, "10 sessions all hashed to one replica"


def test_header_and_body_naming_different_sessions_is_400(cluster):
    response = cluster.client.post("/v1/completions", headers={"X-Session-ID": "one"},
                                   json={"prompt": "x", "max_tokens": 1, "session_id": "two"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "session_id_mismatch"


def test_concurrent_turns_of_one_session_give_one_200_and_409s(cluster):
    cluster.turn("busy-1")  # created and warm
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cluster.turn, "busy-1", "A long story about", 300, ignore_eos=True)
                   for _ in range(4)]
        responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 409, 409, 409], [r.text[:200] for r in responses]
    for r in responses:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "session_busy"
            assert int(r.headers["retry-after"]) >= 1
    info = cluster.client.get("/v1/sessions/busy-1").json()
    assert info["turns"] == 2


def test_session_routes_work_through_the_cluster_with_ownership(cluster):
    created = cluster.client.post("/v1/sessions", json={"metadata": {"user": "u1"}})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    assert cluster.turn(sid, prompt="The cat sat").status_code == 200
    info = cluster.client.get(f"/v1/sessions/{sid}").json()
    assert (info["turns"], info["metadata"]) == (1, {"user": "u1"})
    assert cluster.client.get(f"/v1/sessions/{sid}", headers=AUTH_B).status_code == 404
    assert sid in [s["id"] for s in cluster.client.get("/v1/sessions").json()["data"]]
    assert sid not in [s["id"] for s in cluster.client.get("/v1/sessions", headers=AUTH_B).json()["data"]]
    exported = cluster.client.get(f"/v1/sessions/{sid}/state")
    assert exported.status_code == 200 and len(exported.content) > 0
    fork = cluster.client.post(f"/v1/sessions/{sid}/fork")
    assert fork.status_code == 201
    fork_id = fork.json()["id"]
    assert _same_tensors(cluster.client.get(f"/v1/sessions/{fork_id}/state").content, exported.content)
    target = cluster.client.post("/v1/sessions").json()["id"]
    imported = cluster.client.put(f"/v1/sessions/{target}/state", content=exported.content)
    assert imported.status_code == 200, imported.text
    assert _same_tensors(cluster.client.get(f"/v1/sessions/{target}/state").content, exported.content)
    reset = cluster.client.post(f"/v1/sessions/{sid}/reset")
    assert reset.status_code == 200 and reset.json()["tokens_seen"] == 0
    assert cluster.client.delete(f"/v1/sessions/{sid}").status_code == 200
    assert cluster.client.get(f"/v1/sessions/{sid}").status_code == 404


def test_a_writer_paused_past_its_lease_cannot_commit(cluster):
    assert cluster.turn("fence-1").status_code == 200
    key = next(k for k in _keys(cluster) if k.endswith("/fence-1"))
    stale_store = LeaseStore(cluster.states.client, "paused-writer", LeaseConfig(ttl_ms=500))
    stale = stale_store.acquire(key, renew=False)
    base = cluster.states.head(key).version
    blocked = cluster.turn("fence-1")
    assert blocked.status_code == 409 and blocked.json()["error"]["code"] == "session_busy"
    time.sleep(0.8)  # the paused writer's lease runs out; a replica takes a new epoch and commits
    assert cluster.turn("fence-1").status_code == 200
    with pytest.raises(CommitRejected) as rejected:
        cluster.states.commit(stale, base, b"stale state")
    assert rejected.value.reason == "lease_lost"
    log = cluster.states.log(key)
    assert [c.head.version for c in log] == list(range(1, len(log) + 1))
    assert all(c.head.epoch > stale.epoch for c in log if c.head.version > base)


def test_redis_down_fails_closed_and_recovers_after_a_restart(cluster):
    history = History("redis-1")

    def turn(n: int) -> httpx.Response:
        prompt = f"Turn {n} before and after the restart"
        response = cluster.turn(history.sid, prompt=prompt)
        history.record(prompt, response)
        return response

    assert turn(0).status_code == 200
    cluster.redis.stop()
    try:
        down = turn(1)
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "session_store_unavailable"
        assert down.headers["retry-after"] == "1"
        assert cluster.turn(None).status_code == 200, "a turn without a session needs no store"
    finally:
        cluster.redis.start()
    deadline = time.monotonic() + 20
    n = 2
    while (up := turn(n)).status_code != 200 and time.monotonic() < deadline:
        n += 1
        time.sleep(0.5)
    assert up.status_code == 200, up.text
    assert cluster.client.get("/v1/sessions/redis-1").json()["turns"] == 2, "the head survived the restart (AOF)"
    replay = Replay(max_tokens=4)
    try:
        totals = check(cluster.states, replay, history, owner=ApiKeys((KEY_A,)).principal(KEY_A))
    finally:
        replay.close()
    print(f"oracle after the Redis restart: {totals}")
    assert totals["commits"] == 2 and totals["lost"] == 0 and totals["forks"] == 0


def _keys(cluster):
    return [k.decode().split(":", 2)[2] for k in cluster.states.client.scan_iter(match="adapt:head:*")]


def _same_tensors(a: bytes, b: bytes) -> bool:
    from safetensors.torch import load

    ta, tb = load(a), load(b)
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta) and len(ta) > 0
