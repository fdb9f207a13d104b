"""The datasets the quality benchmarks read, where they are looked for, and the one-line error when one is missing.

They are the project's shared validation texts, kept beside the checkout (``../shared/data``), each with a
PROVENANCE.md there; set ``ADAPT_DATA_DIR`` to read them from another folder with the same layout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA_DIR = Path(os.environ.get("ADAPT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")

# name -> (path under the data folder, what it is and where it comes from)
SOURCES = {
    "tinystories": (
        Path("tinystories") / "tinystories_val.txt",
        "TinyStories validation stories as running text (Hugging Face roneneldan/TinyStories, CDLA-Sharing-1.0)",
    ),
    "wikitext2": (
        Path("wikitext2") / "valid.txt",
        "WikiText-2 v1 wiki.valid.tokens (Merity et al. 2016, CC BY-SA 3.0)",
    ),
}


def data_file(name: str, data_dir: Path | None = None) -> Path:
    """The path of dataset ``name``; exits with one line saying what is missing and where to get it."""
    relative, what = SOURCES[name]
    path = (data_dir or DATA_DIR) / relative
    if not path.is_file():
        script = Path(sys.argv[0]).name
        sys.exit(f"{script}: missing {path}: {what}; put it there or set ADAPT_DATA_DIR to a folder holding {relative}")
    return path
