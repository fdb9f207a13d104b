"""The engine interface: what the edge calls on ``ServerContext.engine``.

The native implementation is ``native.Engine`` (the runtime, its tokenizer and the scheduler's model thread); it is
the seam another engine (vLLM's) plugs into. A request is planned (``plan``: what of a prompt a state must still
read), submitted as a ``Job`` and streamed (``run`` yields its events up to ``Done`` or ``Failed``; leaving early
cancels it). Errors are domain errors (``failures``). This module imports neither torch nor the engine.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from adapt_runtime.serving.engine.detokenize import Detokenizer
    from adapt_runtime.serving.engine.events import Event
    from adapt_runtime.serving.engine.prompt_reader import Prompt
    from adapt_runtime.serving.engine.scheduler import Job
    from transformers import PreTrainedTokenizerBase

    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import FastWeights


class EngineProtocol(Protocol):
    rt: Runtime
    tokenizer: PreTrainedTokenizerBase
    detok: Detokenizer
    max_len: int
    vocab_size: int
    eos_ids: tuple[int, ...]

    @property
    def alive(self) -> bool:
        """The engine can serve (``/health``): false once its model thread is gone."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        """``ids`` if every one is in the vocabulary, else ``InvalidRequest``."""
        ...

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        """``InvalidRequest`` for an empty prompt or one that with ``max_tokens`` exceeds the context."""
        ...

    def plan(self, state: FastWeights, tokens: list[int], echo: bool, max_tokens: int) -> Prompt:
        """What ``state`` must still read of ``tokens`` (a suffix when the prompt extends its KV cache)."""
        ...

    def stop_ids(self, extra: list[int] | None, ignore_eos: bool) -> frozenset[int]: ...

    def run(self, job: Job) -> AsyncGenerator[Event, None]:
        """Submit ``job`` and yield its events up to ``Done`` or ``Failed``; closing the iterator cancels it."""
        ...

    def close(self) -> None:
        """Stop the engine (after its current step)."""
        ...
