"""Pydantic request models: the OpenAI field names, plus ``session_id`` and ``adapt``.

Unknown fields are accepted and ignored, as vLLM does, so clients that send newer OpenAI fields keep working.
Responses are plain dicts built in ``completions.py`` and ``chat.py``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16

Probability = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompts = str | list[str] | TokenIds | list[TokenIds]  # a completion's prompt: one or many, text or token ids


def lone_surrogate(value: object, path: str = "") -> str | None:
    """Where in a JSON value a string holds a lone surrogate (JSON allows "\\ud800"; UTF-8 does not), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(item, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")
        if found is not None:
            return found.lstrip(".")
    return None


class _ValidText(BaseModel):
    """Refuses (400) a body whose strings are not valid Unicode before any field reaches the tokenizer."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: object) -> object:
        where = lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where} holds a lone surrogate (U+D800..U+DFFF), which is not valid Unicode text")
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Generation(_ValidText):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: Probability = 1.0
    top_k: int = Field(0, ge=-1, description="0 or -1: no top-k cut")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP)
    ignore_eos: bool = False
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: str | None = None
    session_id: str | None = Field(None, max_length=128, description="extension: the session to continue")
    adapt: bool = Field(True, description="extension: false applies the session's fast weights without writing")
    long_prompt: bool = Field(False, description="extension: in a session, a prompt longer than the context is "
                              "read into the fast weights first and answered from its last window")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops


class CompletionRequest(_Generation):
    prompt: Prompts
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list) -> str | list:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True


class TokenizeRequest(_ValidText):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # as chat completions take them
    add_special_tokens: bool = True


class ReadRequest(_ValidText):
    """``POST /v1/sessions/{id}/read``: a document as text or token ids (its text checked like a prompt's)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] | None = None
    window: int | None = Field(None, ge=1, description="tokens per context window (default: the context)")
    add_special_tokens: bool = Field(True, description="tokenize text with the tokenizer's BOS")
    stream: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class SessionCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=16
    )
