"""Training text: a text file tokenized once (whole), its tail held out, streams sampled from the rest.

Streams are contiguous spans of ``length`` tokens at uniform random offsets of the training part, drawn from a
``torch.Generator`` whose state the checkpoint keeps (so a resumed run draws the same batches). Held-out streams
are the consecutive spans at the start of the held-out tail, the same at every evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenSplit:
    """A tokenized text file: ``train`` and ``heldout`` (its last ``holdout`` fraction) as 1-D id tensors."""

    train: Tensor
    heldout: Tensor


def load_tokens(path: str | Path, tokenizer, holdout: float) -> TokenSplit:
    """Tokenize ``path`` whole (no special tokens), as ``adapt-eval`` and the benchmarks tokenize a text file, and
    hold out its tail fraction.

    (Line by line, as this did before 2026-12-05, a SentencePiece tokenizer puts its dummy-prefix space at every
    line start and blank lines were dropped: text the runtime never reads that way.)"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--data {path} holds no text")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)
    cut = len(ids) - int(round(len(ids) * holdout))
    return TokenSplit(train=ids[:cut], heldout=ids[cut:])


def sample_streams(tokens: Tensor, rows: int, length: int, generator: torch.Generator) -> Tensor:
    """`[rows, length]` spans of ``tokens`` at random offsets (drawn from ``generator``)."""
    if len(tokens) < length:
        raise ValueError(f"the training text has {len(tokens)} tokens, fewer than one stream of {length}")
    starts = torch.randint(0, len(tokens) - length + 1, (rows,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


def heldout_streams(tokens: Tensor, length: int, count: int) -> Tensor:
    """Up to ``count`` consecutive `[length]` spans from the start of ``tokens`` (`[k, length]`, k may be 0)."""
    k = min(count, len(tokens) // length)
    return tokens[: k * length].reshape(k, length)
