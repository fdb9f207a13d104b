"""Persistence of the session store: what was acknowledged is on disk, what was deleted stays deleted.

Store-level tests with a stand-in state (fast, deterministic): client-named ids across a restart and a crash,
DELETE and TTL reaping racing an eviction or a queued turn, a failed write-through, a kill at every rename of a
commit (a forked child that dies with ``os._exit``, so no cleanup runs), and the older on-disk layout.
"""

from __future__ import annotations

import asyncio
import errno
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from adapt_runtime.serving.edge.errors import http_error
from adapt_runtime.serving.failures import ServingError
from adapt_runtime.serving.sessions import files as session_files
from adapt_runtime.serving.sessions.files import SessionFiles
from adapt_runtime.serving.sessions.local_store import SessionStore
from serve_testing import MODEL

import adapt_runtime.atomic

OWNER = "owner1"
SID = "sess_" + "a" * 22  # a server-made id: items 12-14 do not depend on the restore of client-named ones


class Tagged:
    """Stands in for FastWeights: a tag that survives the round trip through bytes."""

    nbytes = 100

    def __init__(self, tag: str = "fresh") -> None:
        self.tag = tag

    def to_bytes(self) -> bytes:
        return json.dumps({"tag": self.tag}).encode()

    @staticmethod
    def from_bytes(data: bytes) -> Tagged:
        return Tagged(json.loads(data)["tag"])


def store_at(root: Path, **overrides) -> SessionStore:
    options = dict(budget=10_000, max_sessions=100, ttl=3600.0, persistent=True)
    options.update(overrides)
    return SessionStore(Tagged, Tagged.from_bytes, SessionFiles(root), **options)


def restored(root: Path) -> dict[str, tuple[int, str]]:
    """A restarted store's view: id -> (turns, tag of the state on disk)."""
    async def view() -> dict[str, tuple[int, str]]:
        store = store_at(root)
        store.restore()
        out = {}
        for session in store.list(OWNER):
            out[session.id] = (session.record.turns, (await store.acquire(session)).tag)
            store.release(session)
        return out

    return asyncio.run(view())


async def turn(store: SessionStore, sid: str, tag: str) -> None:
    session = store.get(OWNER, sid)
    await store.acquire(session)
    try:
        await store.commit(session, Tagged(tag))
    finally:
        store.release(session)


# item 11: every session comes back, client-named ones included ------------------------------------------------
@pytest.mark.parametrize("shutdown", ["clean", "abandoned"])
def test_client_named_sessions_survive_a_restart(tmp_path, shutdown) -> None:
    async def before() -> str:
        store = store_at(tmp_path)
        made = await store.create(OWNER)
        for sid in ("alice", "bob.v2:x-1", "7"):
            await store.create(OWNER, sid=sid)
            await turn(store, sid, f"{sid}-1")
        await turn(store, made.id, "made-1")
        if shutdown == "clean":
            await store.flush()
        return made.id  # "abandoned": no flush, no close, as after kill -9

    made = asyncio.run(before())
    assert restored(tmp_path) == {"alice": (1, "alice-1"), "bob.v2:x-1": (1, "bob.v2:x-1-1"), "7": (1, "7-1"),
                                  made: (1, "made-1")}


# item 12: a deleted session stays deleted ---------------------------------------------------------------------
def test_delete_ahead_of_a_turn_queued_behind_an_eviction_wins(tmp_path) -> None:
    async def scenario() -> None:
        store = store_at(tmp_path)
        await store.create(OWNER, sid=SID)
        await turn(store, SID, "one")
        session = store.get(OWNER, SID)
        await session.io.acquire()  # an eviction holds the session's I/O lock
        deleting = asyncio.create_task(store.delete(session))
        await asyncio.sleep(0)
        queued = asyncio.create_task(turn(store, SID, "two"))  # found the session before the DELETE ended
        await asyncio.sleep(0.01)
        session.io.release()
        await deleting
        with pytest.raises(ServingError) as gone:
            await queued
        assert http_error(gone.value).status == 404
        with pytest.raises(ServingError):
            store.get(OWNER, SID)

    asyncio.run(scenario())
    assert restored(tmp_path) == {}
    assert not list((tmp_path / OWNER).iterdir())


def test_a_delete_behind_a_running_turn_is_409_and_the_turn_is_kept(tmp_path) -> None:
    async def scenario() -> None:
        store = store_at(tmp_path)
        await store.create(OWNER, sid=SID)
        session = store.get(OWNER, SID)
        await store.acquire(session)
        with pytest.raises(ServingError) as busy:
            await store.delete(session)
        assert http_error(busy.value).status == 409
        await store.commit(session, Tagged("kept"))
        store.release(session)

    asyncio.run(scenario())
    assert restored(tmp_path) == {SID: (1, "kept")}


def test_ttl_expiry_during_an_eviction_write_keeps_the_session_deleted(tmp_path, monkeypatch) -> None:
    gate, writing = threading.Event(), threading.Event()
    real_write = session_files.atomic_write

    def slow_write(path, data):
        if path.name.startswith(SID):
            writing.set()
            gate.wait(10)
        real_write(path, data)

    async def scenario() -> None:
        store = store_at(tmp_path, ttl=60.0)
        await store.create(OWNER, sid=SID, state=Tagged("one"))
        await store.create(OWNER, sid="bob", state=Tagged("bob"))
        session = store.get(OWNER, SID)
        monkeypatch.setattr(session_files, "atomic_write", slow_write)
        store.budget = 150  # over budget: alice, the least recently used, is spilled, slowly
        spill = asyncio.ensure_future(store.fit())
        await asyncio.to_thread(writing.wait, 10)
        session.record.last_used -= 3600  # alice expires while her files are being written
        with pytest.raises(ServingError):
            store.get(OWNER, SID)
        gate.set()
        await spill

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
    assert SID not in restored(tmp_path)
    assert not list((tmp_path / OWNER).glob(f"{SID}*"))


def test_reaping_takes_the_lock_and_spares_a_session_used_meanwhile(tmp_path) -> None:
    async def scenario() -> None:
        store = store_at(tmp_path, ttl=60.0)
        await store.create(OWNER, sid=SID)
        session = store.get(OWNER, SID)
        session.record.last_used -= 3600
        await session.io.acquire()
        reaping = asyncio.create_task(store.reap())
        await asyncio.sleep(0.01)
        assert not reaping.done(), "reaping waits for the session's I/O lock"
        session.record.last_used += 3600  # used again while the reaper waited
        session.io.release()
        assert await reaping == 0

    asyncio.run(scenario())
    assert restored(tmp_path) == {SID: (0, "fresh")}


# item 13: memory changes only after the durable write ------------------------------------------------------
def test_a_failed_write_through_keeps_the_previous_turn(tmp_path, monkeypatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        store = store_at(tmp_path)
        await store.create(OWNER, sid=SID)
        await turn(store, SID, "one")
        with monkeypatch.context() as patch:
            patch.setattr(adapt_runtime.atomic.os, "fsync", disk_full)
            with pytest.raises(ServingError) as failed:
                await turn(store, SID, "two")
            assert http_error(failed.value).status == 503 and failed.value.code == "session_write_failed"
            session = store.get(OWNER, SID)
            assert (session.record.turns, session.state.tag) == (1, "one")
            assert await asyncio.to_thread(restored, tmp_path) == {SID: (1, "one")}  # a restart now
        await turn(store, SID, "two")  # the retry applies the turn once

    asyncio.run(scenario())
    assert restored(tmp_path) == {SID: (2, "two")}
    assert sorted(p.suffix for p in (tmp_path / OWNER).iterdir()) == [".json", ".safetensors"]


def test_a_commit_cancelled_mid_write_leaves_memory_equal_to_disk(tmp_path, monkeypatch) -> None:
    gate, writing = threading.Event(), threading.Event()
    real_write = session_files.atomic_write

    def slow_write(path, data):
        writing.set()
        gate.wait(10)
        real_write(path, data)

    async def scenario() -> str:
        store = store_at(tmp_path)
        await store.create(OWNER, sid=SID)
        monkeypatch.setattr(session_files, "atomic_write", slow_write)
        committing = asyncio.ensure_future(turn(store, SID, "two"))
        await asyncio.to_thread(writing.wait, 10)
        committing.cancel()  # the client went away while its turn was being written
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await committing
        session = store.get(OWNER, SID)
        await store.acquire(session)  # waits for the write, which finishes under the session's lock
        store.release(session)
        return session.state.tag

    try:
        in_memory = asyncio.run(scenario())
    finally:
        gate.set()
    assert restored(tmp_path)[SID][1] == in_memory


# item 14: a commit is one atomic unit ---------------------------------------------------------------------
def _commit_then_die(root: Path, die_at: int) -> None:
    """In a forked child: a second turn whose ``die_at``-th rename is the last thing the process does."""
    real_replace, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] > die_at:
            os._exit(0)
        real_replace(src, dst)

    async def second_turn() -> None:
        store = store_at(root)
        store.restore()
        os.replace = replace
        await turn(store, SID, "two")
        os._exit(0)

    asyncio.run(second_turn())


@pytest.mark.parametrize("die_at", [0, 1, 2])
def test_a_kill_at_any_rename_of_a_commit_leaves_a_whole_turn(tmp_path, die_at) -> None:
    async def first_turn() -> None:
        store = store_at(tmp_path)
        await store.create(OWNER, sid=SID)
        await turn(store, SID, "one")

    asyncio.run(first_turn())
    child = multiprocessing.get_context("fork").Process(target=_commit_then_die, args=(tmp_path, die_at))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    after = restored(tmp_path)
    assert after[SID] in ((1, "one"), (2, "two"))  # never the new state with the old count, or the reverse
    if die_at >= 2:
        assert after[SID] == (2, "two")
    names = sorted(p.name for p in (tmp_path / OWNER).iterdir())
    assert len(names) == 2 and f"{SID}.json" in names, names  # leftovers of the interrupted commit are gone


def test_the_older_layout_loads_and_moves_to_the_new_one(tmp_path) -> None:
    folder = tmp_path / OWNER
    folder.mkdir()
    (folder / f"{SID}.safetensors").write_bytes(Tagged("old").to_bytes())
    (folder / f"{SID}.json").write_text(json.dumps({"id": SID, "owner": OWNER, "created_at": time.time(),
                                                   "last_used": time.time(), "turns": 4, "metadata": {"k": "v"}}))
    assert restored(tmp_path) == {SID: (4, "old")}

    async def next_turn() -> None:
        store = store_at(tmp_path)
        store.restore()
        await turn(store, SID, "new")

    asyncio.run(next_turn())
    assert restored(tmp_path) == {SID: (5, "new")}
    assert not (folder / f"{SID}.safetensors").exists()


# issue 16 item 4: one schema for a session, resident or on disk ------------------------------------------------
class Counted(Tagged):
    """A stand-in state with the counters a session's GET reports."""

    def __init__(self, tag: str = "fresh", tokens_seen: int = 0) -> None:
        super().__init__(tag)
        self.tokens_seen, self.kv_len, self.writes, self.refused_writes = tokens_seen, tokens_seen % 7, 3, 1

    def to_bytes(self) -> bytes:
        return json.dumps({"tag": self.tag, "tokens_seen": self.tokens_seen}).encode()

    @staticmethod
    def from_bytes(data: bytes) -> Counted:
        return Counted(**json.loads(data))


def test_a_session_on_disk_reports_what_it_reported_resident(tmp_path) -> None:
    def store() -> SessionStore:
        return SessionStore(Counted, Counted.from_bytes, SessionFiles(tmp_path), budget=10_000, max_sessions=100,
                            ttl=3600.0, persistent=True)

    async def before() -> dict:
        first = store()
        session = await first.create(OWNER, sid=SID)
        await first.acquire(session)
        await first.commit(session, Counted("one", tokens_seen=45))
        first.release(session)
        return session.info()

    async def after() -> tuple[dict, dict]:
        second = store()
        second.restore()
        session = second.get(OWNER, SID)
        on_disk = session.info()
        await second.acquire(session)
        second.release(session)
        return on_disk, session.info()

    resident = asyncio.run(before())
    on_disk, loaded = asyncio.run(after())
    assert resident["resident"] and not on_disk["resident"] and loaded["resident"]
    assert set(on_disk) == set(resident) == set(loaded)
    assert {k: v for k, v in on_disk.items() if k != "resident"} == {k: v for k, v in resident.items()
                                                                     if k != "resident"}
    assert (on_disk["tokens_seen"], on_disk["kv_len"], on_disk["writes"], on_disk["bytes"]) == (45, 3, 3, 100)


def test_an_older_sidecar_without_counters_reports_them_unknown(tmp_path) -> None:
    folder = tmp_path / OWNER
    folder.mkdir()
    (folder / f"{SID}.safetensors").write_bytes(Counted("old", tokens_seen=9).to_bytes())
    (folder / f"{SID}.json").write_text(json.dumps({"id": SID, "owner": OWNER, "created_at": time.time(),
                                                   "last_used": time.time(), "turns": 4, "metadata": {}}))

    async def view() -> tuple[dict, dict]:
        restarted = SessionStore(Counted, Counted.from_bytes, SessionFiles(tmp_path), budget=10_000,
                                 max_sessions=100, ttl=3600.0, persistent=True)
        restarted.restore()
        session = restarted.get(OWNER, SID)
        unknown = session.info()
        await restarted.acquire(session)
        restarted.release(session)
        return unknown, session.info()

    unknown, loaded = asyncio.run(view())
    assert set(unknown) == set(loaded)
    fields = ("tokens_seen", "kv_len", "writes", "refused_writes", "bytes")
    assert all(unknown[k] is None for k in fields), unknown
    assert loaded["tokens_seen"] == 9 and loaded["bytes"] == 100


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_session_get_is_the_same_before_and_after_a_restart(launch, tmp_path, stop) -> None:
    server = launch("--rule", "hebbian", "--session-dir", str(tmp_path / "sessions"))
    sid = server.new_session()
    server.client().completions.create(model=MODEL, prompt="Once upon a time there was a dog named Max. " * 6,
                                       max_tokens=3, temperature=0, extra_headers={"X-Session-ID": sid})
    before = server.session_info(sid)
    assert before["resident"] and before["tokens_seen"] > 0 and before["writes"] > 0
    server.stop(signal.SIGKILL if stop == "sigkill" else signal.SIGTERM)
    server.start()
    after = server.session_info(sid)
    assert not after["resident"], "a restarted server loads a session on its first use"
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if k != "resident"} == {k: v for k, v in before.items()
                                                                   if k != "resident"}
