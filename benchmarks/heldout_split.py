"""Write a source's tune and held-out parts as two text files, cut where ``long_memory_sweep.py --split`` cuts.

    python benchmarks/heldout_split.py --out-dir runs/split                      # TinyStories valid
    adapt-train --data runs/split/tinystories.tune.txt ...                        # trains on the tune part only
    adapt-eval run --data runs/split/tinystories.heldout.txt ...                  # episodes from the held-out part

``long_memory_sweep.py`` tokenizes the whole file and calls its first 75% of token ids the tune part, the rest the
held-out part. Here the text is cut at the last line boundary whose prefix tokenizes to at most that many ids (and
to exactly the first ids of the whole file), so the tune file holds only tune text, and the held-out file holds all
of the sweep's held-out part (and a few tokens before it, up to the line boundary). ``adapt-train`` then holds out
its own ``--holdout`` tail of the tune file for ``--eval-every``; ``adapt-eval`` reads the held-out file whole.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from bench_data import DATA_DIR, SOURCES, data_file
from long_memory_sweep import TUNE_FRACTION

import adapt_runtime as ar


def cut_offset(text: str, encode, fraction: float = TUNE_FRACTION) -> int:
    """The character offset of the cut: the last line start whose prefix encodes to at most ``fraction`` of the
    whole text's ids and to exactly their first ids."""
    ids = encode(text)
    limit = int(len(ids) * fraction)
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    lo, hi = 0, len(starts) - 1  # the largest k with len(encode(text[:starts[k]])) <= limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(text[: starts[mid]])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    for k in range(lo, -1, -1):
        head = encode(text[: starts[k]])
        if head == ids[: len(head)]:
            return starts[k]
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of the shared datasets")
    ap.add_argument("--sources", default="tinystories", help=f"comma list of {', '.join(SOURCES)}")
    ap.add_argument("--out-dir", type=Path, required=True, help="where SOURCE.tune.txt and SOURCE.heldout.txt go")
    args = ap.parse_args()
    _, tokenizer = ar.load_model("llama")
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for source in args.sources.split(","):
        text = data_file(source, args.data_dir).read_text(encoding="utf-8")
        at = cut_offset(text, encode)
        for part, piece in (("tune", text[:at]), ("heldout", text[at:])):
            path = args.out_dir / f"{source}.{part}.txt"
            path.write_text(piece, encoding="utf-8")
            digest = hashlib.sha256(piece.encode()).hexdigest()[:16]
            print(f"{path}: {len(piece)} characters, {len(encode(piece))} tokens, sha256 {digest}...")


if __name__ == "__main__":
    main()
