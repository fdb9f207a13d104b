"""On-disk layout of sessions: ``<dir>/<owner>/<id>.safetensors`` (the runtime's state file) beside
``<id>.json`` (owner, timestamps, turns, metadata). Both are written atomically: temp file, fsync, rename.

The state file is written first, so a crash leaves either the old pair, or a new state with an old sidecar
(whose counters lag by a turn); never a torn file. Leftover temp files are removed on startup.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapt_runtime.atomic import atomic_write as core_atomic_write

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
OWNER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class SessionRecord:
    """What the sidecar holds: everything about a session except its tensors."""

    id: str
    owner: str
    created_at: float
    last_used: float
    turns: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


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
        return self._folder(record.owner) / f"{record.id}.safetensors"

    def write_state(self, record: SessionRecord, state: Any) -> None:
        atomic_write(self.state_path(record), state.to_bytes())

    def write_record(self, record: SessionRecord) -> None:
        atomic_write(self._folder(record.owner) / f"{record.id}.json", json.dumps(asdict(record)).encode())

    def has_state(self, record: SessionRecord) -> bool:
        return self.state_path(record).is_file()

    def read_state(self, record: SessionRecord) -> bytes:
        return self.state_path(record).read_bytes()

    def remove(self, record: SessionRecord) -> None:
        folder = self._folder(record.owner)
        for name in (f"{record.id}.safetensors", f"{record.id}.json"):
            (folder / name).unlink(missing_ok=True)

    def scan(self) -> list[SessionRecord]:
        """Every session persisted under the root; damaged sidecars are skipped, temp files removed."""
        records = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and OWNER.match(p.name)):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            for sidecar in sorted(folder.glob("sess_*.json")):
                record = _parse(sidecar, folder.name)
                if record is not None:
                    records.append(record)
        return records

    def _folder(self, owner: str) -> Path:
        if not OWNER.match(owner):
            raise ValueError(f"invalid owner id {owner!r}")
        return self.root / owner


def _parse(sidecar: Path, owner: str) -> SessionRecord | None:
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        record = SessionRecord(**data)
    except (OSError, ValueError, TypeError):
        return None
    if record.owner != owner or not SESSION_ID.match(record.id) or sidecar.stem != record.id:
        return None
    return record
