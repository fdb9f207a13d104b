"""Hashed seeds: every random choice in a task derives from sha256 of its coordinates, never from hash()."""

from __future__ import annotations

import hashlib
import random


def hashed_seed(*parts: object) -> int:
    """A 63-bit seed from the coordinates of a random choice, e.g. ("niah", "depth50", 512, 0, 3)."""
    key = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def rng_for(*parts: object) -> random.Random:
    """A private random.Random seeded by hashed_seed(*parts)."""
    return random.Random(hashed_seed(*parts))
