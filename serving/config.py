"""ServerConfig: every knob of ``adapt-serve`` in one frozen dataclass (the CLI maps onto it by keyword)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per decode step (see benchmarks/prefill_interleave.py)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server process. Validated on construction; errors name the field."""

    model: str = "llama"
    rule: str = "hebbian"
    rule_config: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    served_model_name: str | None = None
    max_model_len: int | None = None
    max_sessions: int = 1024
    auto_create_sessions: bool = True
    session_memory_budget: int = 256 * 2**20
    session_dir: Path | None = None
    session_ttl: float = 7 * 24 * 3600.0
    max_request_bytes: int = 2 * 2**20
    max_concurrent_requests: int = 64
    chat_template: str | None = None
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
    max_read_tokens: int = 262144
    max_choices_per_request: int = 64
    max_tokens_per_request: int = 262144
    max_sessions_per_key: int | None = None
    read_timeout: float = 30.0
    send_timeout: float = 60.0
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK  # prompt tokens between two decode steps; 0/None: whole
    state_rank: int | None = None  # each session's S as rank-r factors B A (``ar.patch(state_rank=r)``); None: dense

    def __post_init__(self) -> None:
        from adapt_runtime.rules import rule_names  # the registry is the one list of rules

        if self.rule not in rule_names():
            raise ValueError(f"rule: {self.rule!r} is not one of {', '.join(rule_names())}")
        positive = ("max_sessions", "session_memory_budget", "max_request_bytes", "max_concurrent_requests",
                    "max_read_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.session_ttl <= 0:
            raise ValueError(f"session_ttl: must be > 0 seconds, got {self.session_ttl}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads: must be > 0, got {self.threads}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len: must be > 0, got {self.max_model_len}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ValueError("api_keys: keys must be non-empty and carry no surrounding whitespace")
        for name in ("max_choices_per_request", "max_tokens_per_request", "read_timeout", "send_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_sessions_per_key is not None and self.max_sessions_per_key <= 0:
            raise ValueError(f"max_sessions_per_key: must be > 0, got {self.max_sessions_per_key}")
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk: must be >= 0 (0: whole prompts at once), got {self.prefill_chunk}")
        if self.state_rank is not None and (type(self.state_rank) is not int or self.state_rank <= 0):
            raise ValueError(f"state_rank: must be an integer > 0, got {self.state_rank!r}")
        if self.state_rank is not None and self.rule_config.get("state_rank", self.state_rank) != self.state_rank:
            raise ValueError(f"state_rank: {self.state_rank} differs from the rule config's state_rank "
                             f"{self.rule_config['state_rank']!r}; give it once")

    @property
    def session_quota(self) -> int:
        """Sessions one key may hold: ``max_sessions_per_key``, by default a quarter of ``max_sessions`` when
        several keys share the server (so one key cannot lock the others out), else all of them."""
        if self.max_sessions_per_key is not None:
            return min(self.max_sessions_per_key, self.max_sessions)
        return max(1, self.max_sessions // 4) if len(self.api_keys) > 1 else self.max_sessions

    @property
    def patch_options(self) -> dict[str, Any]:
        """The keyword arguments of ``ar.patch`` besides the rule: the rule config, with ``state_rank``."""
        options = dict(self.rule_config)
        if self.state_rank is not None:
            options["state_rank"] = self.state_rank
        return options

    @property
    def model_name(self) -> str:
        """The id clients see in ``/v1/models`` and must send as ``model`` (or omit)."""
        return self.served_model_name or self.model


def parse_rule_config(text: str | None) -> dict[str, Any]:
    """``--rule-config '{"lr": 0.01}'`` -> dict; a clear ValueError for anything but a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"rule_config: not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise ValueError("rule_config: must be a JSON object such as '{\"lr\": 0.01}'")
    return value


def read_api_key_file(path: Path) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
