"""Running text for the text tasks: a user's file (--data), or synthetic stories made from templates.

The synthetic stories exist so that the text tasks run with no data at all (CI, a first try). They are
simple, repetitive children's-story sentences, in the register of TinyStories; real measurements should
pass a real text with --data.
"""

from __future__ import annotations

from pathlib import Path

from adapt_runtime.eval.episode import Encode
from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.words import NAMES, NOUNS, PLACES, VALUES

_SENTENCES = (
    "{a} went to the {p} with a {n}.",
    "The {n} was very {v}, and {a} liked it.",
    "{a} said, \"Look at my {v} {n}!\"",
    "{b} smiled and gave {a} a {v} {n}.",
    "They played in the {p} all day.",
    "Then {a} saw a {v} {n} near the {p}.",
    "{a} and {b} were happy to be friends.",
    "At night, {a} went home and slept.",
)

_cache: dict[tuple, list[int]] = {}


def synthetic_story(seed: int, index: int, sentences: int = 12) -> str:
    """One short story; the same (seed, index) always gives the same text."""
    rng = rng_for("synthetic-story", seed, index)
    a, b = rng.sample(NAMES, 2)
    lines = [f"Once upon a time, there was a child named {a}."]
    for _ in range(sentences):
        tpl = rng.choice(_SENTENCES)
        lines.append(tpl.format(a=a, b=b, p=rng.choice(PLACES), n=rng.choice(NOUNS), v=rng.choice(VALUES)))
    return " ".join(lines)


def read_text(path: Path) -> str:
    """The file's text (UTF-8); a clear error for a missing, empty or binary file."""
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"--data {path}: the file is empty")
    return text


def corpus_ids(encode: Encode, data: Path | None, seed: int, min_tokens: int) -> list[int]:
    """Token ids of the whole --data file, or of enough synthetic stories to hold min_tokens."""
    if data is not None:
        st = data.stat() if data.is_file() else None
        key = (str(data), st and st.st_size, st and st.st_mtime_ns, encode)
        if key not in _cache:
            _cache[key] = encode(read_text(data))
        return _cache[key]
    ids: list[int] = []
    i = 0
    while len(ids) < min_tokens:
        ids += encode(synthetic_story(seed, i) + "\n\n")
        i += 1
    return ids
