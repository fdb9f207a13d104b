"""Incremental detokenization with stop strings.

SentencePiece-style tokenizers drop the leading space of the first decoded token, so a continuation is decoded
after an *anchor* (the last prompt token) and the anchor's own text is cut off. Text that may still turn into a
stop string, or that ends in an incomplete UTF-8 sequence, is held back until it is safe to emit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Token ids -> text for one tokenizer; ``piece`` gives a token's text as it reads mid-sentence."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        filler = tokenizer.encode("a", add_special_tokens=False)
        self._filler = filler[-1:] if filler else []
        self.piece = lru_cache(maxsize=None)(self._piece)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def continuation(self, ids: list[int], anchor: list[int]) -> str:
        """The text ``ids`` add after ``anchor``."""
        if not anchor:
            return self.decode(ids)
        head = self.decode(anchor)
        full = self.decode(anchor + ids)
        return full[len(head) :] if full.startswith(head) else self.decode(ids)

    def anchor(self, prompt: list[int]) -> list[int]:
        """The last non-special prompt token, or nothing."""
        for token in reversed(prompt):
            if token not in self.special:
                return [token]
        return []

    def _piece(self, token: int) -> str:
        if token in self.special:
            return str(self.tokenizer.convert_ids_to_tokens(token))
        return self.continuation([token], self._filler)


class TextStream:
    """The generated text of one row, fed token by token; reports when a stop string completes."""

    def __init__(self, detok: Detokenizer, anchor: list[int], stops: tuple[str, ...]) -> None:
        self.detok = detok
        self.anchor = anchor
        self.stops = stops
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text now safe to emit, whether a stop string ended the text)."""
        self.ids.append(token)
        full = self.detok.continuation(self.ids, self.anchor)
        start = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = full[: min(hits)]
            return self._take(len(self.text)), True
        self.text = full
        safe = len(full.rstrip(REPLACEMENT))
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, safe), hold, -1):
                if full[safe - size : safe] == stop[:size]:
                    hold = size
                    break
        return self._take(safe - hold), False

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
