"""Atomic text and JSON files for run outputs (on the runtime's ``atomic_open``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapt_runtime.atomic import atomic_open


def write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n")
