"""Immutable versioned state blobs under an fsspec URL (a local or NFS directory, ``s3://...``, ``memory://``).

A blob is ``{root}/{key}/v{version:010d}-{epoch}-{nonce}.safetensors`` and is never rewritten: a writer that loses
the head's compare-and-swap leaves a blob nobody points to, which it deletes, or the next commit's garbage
collection does. Local paths are written temp + fsync + rename; object stores get one PUT (atomic by itself).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets

import fsspec
from adapt_runtime.serving.types import JsonObject

from adapt_runtime.atomic import atomic_write

BLOB = re.compile(r"^v(\d{10})-(\d+)-([0-9a-f]+)\.safetensors$")


def blob_version(name: str) -> int:
    match = BLOB.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a state blob name")
    return int(match.group(1))


class BlobStore:
    """Reads and writes the blobs of every session key under one URL."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in _protocols(self.fs)
        self.fs.makedirs(self.root, exist_ok=True)

    def _dir(self, key: str) -> str:
        return f"{self.root}/{key}"

    def new_name(self, version: int, epoch: int) -> str:
        return f"v{version:010d}-{epoch}-{secrets.token_hex(4)}.safetensors"

    def put(self, key: str, name: str, data: bytes) -> None:
        """Write a new blob (never an existing one)."""
        self._write(f"{self._dir(key)}/{name}", data)

    def get(self, key: str, name: str) -> bytes:
        return self.fs.cat_file(f"{self._dir(key)}/{name}")

    def exists(self, key: str, name: str) -> bool:
        return self.fs.exists(f"{self._dir(key)}/{name}")

    def names(self, key: str) -> list[str]:
        """The blob names of ``key``, oldest version first."""
        try:
            entries = self.fs.ls(self._dir(key), detail=False)
        except FileNotFoundError:
            return []
        names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted((n for n in names if BLOB.match(n)), key=lambda n: (blob_version(n), n))

    def remove(self, key: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{self._dir(key)}/{name}")

    def remove_all(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._dir(key), recursive=True)

    def collect(self, key: str, head: str, keep: int) -> int:
        """After ``head`` was committed: drop other blobs of its version (losers) and, with ``keep`` > 0, every
        blob older than the last ``keep`` versions. Returns how many were removed."""
        version = blob_version(head)
        removed = 0
        for name in self.names(key):
            v = blob_version(name)
            if (v == version and name != head) or (keep > 0 and v <= version - keep):
                self.remove(key, name)
                removed += 1
        return removed

    def mirror_head(self, key: str, head: JsonObject) -> None:
        """``head.json`` beside the blobs: a copy of the committed head for disaster recovery without Redis."""
        self._write(f"{self._dir(key)}/head.json", json.dumps(head).encode())

    def read_mirror(self, key: str) -> JsonObject | None:
        try:
            return json.loads(self.fs.cat_file(f"{self._dir(key)}/head.json"))
        except FileNotFoundError:
            return None

    def _write(self, path: str, data: bytes) -> None:
        if self.local:
            atomic_write(path, data)
        else:
            self.fs.pipe_file(path, data)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
