"""On-disk layout of sessions: ``<dir>/<owner>/<id>.json``, the sidecar (owner, timestamps, turns, metadata, the
name of the state file and that state's ``stats``: counters and size, what a session's GET reports), beside
``<id>~<generation>.safetensors`` (the runtime's state file).

One commit is one atomic unit: the state goes to a new generation's file (temp file, fsync, rename), then the
sidecar that names it replaces the old sidecar the same way; the rename of the sidecar is the commit point. A
crash before it leaves the old sidecar naming the old state file (still there), a crash after it the new pair;
never a new state with old counters. The superseded state file is removed after the commit, and on startup
leftovers (temp files, state files no sidecar names) are. ``~`` cannot occur in a session id, so generation
names never collide with ids.

Older layouts load too: a sidecar without ``state_file`` names ``<id>.safetensors`` (the next commit moves the
session to the new layout); a sidecar without ``stats`` (or with damaged ones) loads with them unknown: the
session's GET reports those fields as null until the state is next loaded or written (the state file is not
read for them: restoring stays a scan of sidecars).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapt_runtime.serving.failures import Conflict, InvalidRequest

import adapt_runtime as ar
from adapt_runtime.atomic import atomic_write as core_atomic_write

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import FastWeights

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
OWNER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
GENERATION = "~"

log = logging.getLogger("adapt_serve")


@dataclass
class SessionRecord:
    """What the sidecar holds: everything about a session except its tensors, and where those are."""

    id: str
    owner: str
    created_at: float
    last_used: float
    turns: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    state_file: str | None = None  # the state file's name in the owner's folder; None: ``<id>.safetensors``
    stats: dict[str, int | None] | None = None  # ``state_stats`` of that state file; None: an older sidecar


STAT_FIELDS = ("tokens_seen", "kv_len", "writes", "refused_writes", "bytes")


def state_stats(state: FastWeights) -> dict[str, int | None]:
    """What ``GET /v1/sessions/{id}`` reports of a state: its counters and its size in memory (``nbytes``). Kept
    in the sidecar, written with the state it describes, so a session on disk reports the same as a resident
    one; a counter that a state type lacks is None (unknown)."""
    return {name: getattr(state, "nbytes" if name == "bytes" else name, None) for name in STAT_FIELDS}


def atomic_write(path: Path, data: bytes) -> None:
    """Write a session file atomically, readable by the server's user alone (folder 0700, file 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    core_atomic_write(path, data, permissions=0o600)


class SessionFiles:
    """Reads and writes session files under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def state_path(self, record: SessionRecord) -> Path:
        return self._folder(record.owner) / (record.state_file or f"{record.id}.safetensors")

    def write(self, record: SessionRecord, state: FastWeights) -> SessionRecord:
        """Write ``state`` and ``record`` as one commit; returns the record naming the new state file (the
        caller keeps it). Raises ``OSError`` (disk full, ...) with the previous commit still in place."""
        name = f"{record.id}{GENERATION}{secrets.token_hex(6)}.safetensors"
        new = dataclasses.replace(record, state_file=name, stats=state_stats(state))
        folder = self._folder(record.owner)
        atomic_write(folder / name, state.to_bytes())
        try:
            self.write_record(new)
        except BaseException:
            (folder / name).unlink(missing_ok=True)
            raise
        for old in self._state_files(folder, record.id):
            if old.name != name:
                try:
                    old.unlink(missing_ok=True)
                except OSError as err:  # committed already; scan removes what is left
                    log.warning("cannot remove the superseded %s: %s", old.name, err)
        return new

    def write_record(self, record: SessionRecord) -> None:
        """Replace the sidecar alone (the commit point of ``write``)."""
        atomic_write(self._folder(record.owner) / f"{record.id}.json", json.dumps(asdict(record)).encode())

    def has_state(self, record: SessionRecord) -> bool:
        return self.state_path(record).is_file()

    def read_state(self, record: SessionRecord) -> bytes:
        return self.state_path(record).read_bytes()

    def remove(self, record: SessionRecord) -> None:
        """Delete a session: the sidecar first (a crash after it leaves no session, only files scan removes)."""
        folder = self._folder(record.owner)
        (folder / f"{record.id}.json").unlink(missing_ok=True)
        for path in self._state_files(folder, record.id):
            path.unlink(missing_ok=True)

    def scan(self) -> list[SessionRecord]:
        """Every session persisted under the root, server-made or client-named; damaged sidecars are skipped
        (their files kept), temp files and state files that no sidecar names are removed."""
        records = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and OWNER.fullmatch(p.name)):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            kept: set[str] = set()
            for sidecar in sorted(folder.glob("*.json")):
                if not SESSION_ID.fullmatch(sidecar.stem):
                    continue
                kept.add(sidecar.stem)
                record = _parse(sidecar, folder.name)
                if record is not None:
                    records.append(record)
            named = {self.state_path(r).name for r in records if r.owner == folder.name}
            for path in folder.glob(f"*{GENERATION}*.safetensors"):
                sid = path.name.split(GENERATION, 1)[0]
                if path.name not in named and (sid not in kept or _valid_sidecar(folder, sid)):
                    log.info("removing %s: no session names it (an interrupted commit or delete)", path.name)
                    path.unlink(missing_ok=True)
        return records

    def _state_files(self, folder: Path, sid: str) -> list[Path]:
        legacy = folder / f"{sid}.safetensors"
        return [*folder.glob(f"{sid}{GENERATION}*.safetensors"), *([legacy] if legacy.is_file() else [])]

    def _folder(self, owner: str) -> Path:
        if not OWNER.fullmatch(owner):
            raise ValueError(f"invalid owner id {owner!r}")
        return self.root / owner


def _valid_sidecar(folder: Path, sid: str) -> bool:
    return _parse(folder / f"{sid}.json", folder.name) is not None


def _parse(sidecar: Path, owner: str) -> SessionRecord | None:
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        record = SessionRecord(**data)
    except (OSError, ValueError, TypeError):
        return None
    if record.owner != owner or not SESSION_ID.fullmatch(record.id) or sidecar.stem != record.id:
        return None
    name = record.state_file
    if name is not None and (not isinstance(name, str) or not name.startswith(f"{record.id}{GENERATION}")
                             or "/" in name or not name.endswith(".safetensors")):
        return None
    if not _valid_stats(record.stats):  # only a report: the session loads, its numbers are unknown until used
        record.stats = None
    return record


def _valid_stats(stats: object) -> bool:
    return isinstance(stats, dict) and set(stats) == set(STAT_FIELDS) and all(
        v is None or (type(v) is int and v >= 0) for v in stats.values())


def decode_state(data: bytes, rt: Runtime) -> FastWeights:
    """Bytes of a state file -> a state for ``rt``: ``Conflict`` when they are a well-formed state of another model,
    rule, rule options or format version, ``InvalidRequest`` for anything else wrong (every tensor and counter is
    checked; see ``adapt_runtime.state_validation``). Nothing is changed on a refusal. The store loads spilled and
    imported states through it."""
    if not data:
        raise InvalidRequest("the body is empty; send the bytes of an exported state", "invalid_state")
    try:
        return ar.state_from_bytes(data, rt)
    except ar.IncompatibleStateError as err:
        raise Conflict(str(err), "session_incompatible") from None
    except ar.StateFileError as err:
        raise InvalidRequest(str(err), "invalid_state") from None
    except RecursionError:  # the safetensors header is JSON; nested deep, its parser recurses past the limit
        raise InvalidRequest("state file is corrupt: its header nests too deep", "invalid_state") from None
