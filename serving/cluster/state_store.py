"""Durable session state: immutable blobs (``BlobStore``) plus a head in Redis moved by a fenced compare-and-swap.

``head:{key}`` is ``"version epoch blob"``; version 0 (no head) is a fresh state. A turn that read version ``base``
commits by writing blob ``base + 1`` and then running one Lua script that moves the head only if the caller's
lease token is still the lease (the fence: a writer paused past its TTL, or whose lease was taken by a later
epoch, is refused) and the head is still ``base`` (no lost update). Every accepted commit is appended to
``log:{key}`` (``"base version epoch blob"``), from which tests check that a session's history is linear.
``meta:{key}`` holds the session record (owner, timestamps, turns, metadata) and ``index:{owner}`` its ids.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis
from adapt_runtime.serving.cluster.blobs import BlobStore
from adapt_runtime.serving.cluster.lease import Lease, LeaseStore, StoreUnavailable, _call
from adapt_runtime.serving.types import JsonObject

COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, ''} end
local head = redis.call('GET', KEYS[2])
local current = 0
if head then current = tonumber(string.match(head, '^(%d+)')) end
if current ~= tonumber(ARGV[2]) then return {-2, head or ''} end
local value = ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. ARGV[5]
redis.call('SET', KEYS[2], value)
redis.call('RPUSH', KEYS[3], ARGV[2] .. ' ' .. value)
local history = tonumber(ARGV[8])
if history > 0 then redis.call('LTRIM', KEYS[3], -history, -1) end
redis.call('HINCRBY', KEYS[4], 'turns', ARGV[6])
redis.call('HSET', KEYS[4], 'last_used', ARGV[7])
return {1, value}
"""

CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""

DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('SREM', KEYS[5], ARGV[2])
redis.call('SREM', KEYS[6], ARGV[3])
return 1
"""


class CommitRejected(Exception):
    """The head did not move: the lease is no longer the caller's (``reason='lease_lost'``) or another commit
    moved the head first (``reason='head_moved'``)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"commit of session {key} rejected: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class Head:
    version: int
    epoch: int
    blob: str

    @classmethod
    def parse(cls, value: bytes | str) -> Head:
        text = value.decode() if isinstance(value, bytes) else value
        version, epoch, blob = text.split(" ", 2)
        return cls(int(version), int(epoch), blob)


@dataclass(frozen=True)
class Commit:
    base: int
    head: Head


class StateStore:
    """Heads, commits and session records of one cluster (one Redis, one blob URL)."""

    def __init__(self, leases: LeaseStore, blobs: BlobStore, keep_versions: int = 2, history: int = 1000) -> None:
        self.leases = leases
        self.blobs = blobs
        self.keep_versions = keep_versions
        self.history = history
        self.client: redis.Redis = leases.client
        self.prefix = leases.config.prefix
        self._commit = self.client.register_script(COMMIT)
        self._delete = self.client.register_script(DELETE)
        self._create = self.client.register_script(CREATE)

    def _k(self, kind: str, key: str) -> str:
        return f"{self.prefix}:{kind}:{key}"

    def head(self, key: str) -> Head | None:
        value = _call(self.client.get, self._k("head", key))
        return None if value is None else Head.parse(value)

    def load(self, key: str, head: Head) -> bytes:
        try:
            return self.blobs.get(key, head.blob)
        except OSError as err:
            raise StoreUnavailable(f"state blob {key}/{head.blob} cannot be read: {err}") from err

    def commit(self, lease: Lease, base: int, data: bytes, turn: bool = True) -> Head:
        """Write blob ``base + 1`` and move the head to it under ``lease``; ``CommitRejected`` if fenced off."""
        key = lease.key
        name = self.blobs.new_name(base + 1, lease.epoch)
        try:
            self.blobs.put(key, name, data)
        except OSError as err:
            raise StoreUnavailable(f"state blob {key}/{name} cannot be written: {err}") from err
        keys = [self.leases.lease_key(key), self._k("head", key), self._k("log", key), self._k("meta", key)]
        args = [lease.token, base, base + 1, lease.epoch, name, int(turn), f"{time.time():.3f}", self.history]
        try:
            status, value = _call(self._commit, keys, args)
        except StoreUnavailable:
            self.blobs.remove(key, name)
            raise
        if int(status) != 1:
            self.blobs.remove(key, name)
            raise CommitRejected(key, "lease_lost" if int(status) == -1 else "head_moved")
        head = Head.parse(value)
        try:
            self.blobs.mirror_head(key, {"version": head.version, "epoch": head.epoch, "blob": head.blob})
            self.blobs.collect(key, head.blob, self.keep_versions)
        except OSError:
            pass  # the head is committed; the mirror and the clean-up are best effort
        return head

    def log(self, key: str) -> list[Commit]:
        """The accepted commits of ``key`` in order (the last ``history`` of them)."""
        entries = _call(self.client.lrange, self._k("log", key), 0, -1)
        commits = []
        for entry in entries:
            base, rest = entry.decode().split(" ", 1)
            commits.append(Commit(int(base), Head.parse(rest)))
        return commits

    # session records --------------------------------------------------------------------------------------

    def create_record(self, owner: str, key: str, sid: str, metadata: dict[str, str]) -> bool:
        """Register a session; False if it already exists (then nothing changes)."""
        now = f"{time.time():.3f}"
        record = {"owner": owner, "id": sid, "created_at": now, "last_used": now, "turns": 0,
                  "metadata": json.dumps(metadata)}
        fields = [v for item in record.items() for v in item]
        keys = [self._k("meta", key), self._k("index", owner), f"{self.prefix}:all"]
        return bool(_call(self._create, keys, [sid, key, *fields]))

    def record(self, key: str) -> JsonObject | None:
        raw = _call(self.client.hgetall, self._k("meta", key))
        if not raw:
            return None
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return {"owner": data.get("owner", ""), "id": data.get("id", ""),
                "created_at": float(data.get("created_at", 0)), "last_used": float(data.get("last_used", 0)),
                "turns": int(data.get("turns", 0)), "metadata": json.loads(data.get("metadata", "{}"))}

    def ids(self, owner: str) -> list[str]:
        return sorted(m.decode() for m in _call(self.client.smembers, self._k("index", owner)))

    def count(self) -> int:
        return int(_call(self.client.scard, f"{self.prefix}:all"))

    def delete(self, lease: Lease, owner: str, sid: str) -> bool:
        """Remove a session (record, head, log, blobs) under its lease."""
        key = lease.key
        keys = [self.leases.lease_key(key), self._k("head", key), self._k("log", key), self._k("meta", key),
                self._k("index", owner), f"{self.prefix}:all"]
        deleted = bool(_call(self._delete, keys, [lease.token, sid, key]))
        if deleted:
            self.blobs.remove_all(key)
        return deleted

