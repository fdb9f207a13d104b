"""ServerConfig: every knob of ``adapt-serve`` in one frozen dataclass (the CLI maps onto it by keyword)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from adapt_runtime.serving.types import JsonObject

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per decode step (see benchmarks/prefill_interleave.py)

T = TypeVar("T")


def knob(default: T, help: str, *, kind: str | None = None, flag: str | None = None, metavar: str | None = None,
         shown: str | None = None) -> T:
    """A ``ServerConfig`` field with its one help text; ``adapt-serve`` makes its option from it.

    ``kind`` says how the command line reads it when not from the type alone: ``bytes`` (512K, 2M), ``duration``
    (30s, 24h, 7d), ``json`` (an object), ``rule`` (a registry name), ``keys`` (repeatable), ``switch``
    (``--x/--no-x``), ``dir``, ``file``, or ``choice:a|b|c``; ``flag`` the option's name when it is not the field's;
    ``shown`` the default as ``--help`` prints it.
    """
    meta = {"help": help, "kind": kind, "flag": flag, "metavar": metavar, "shown": shown}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)  # type: ignore[return-value]  # an empty dict is a T
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server process. Validated on construction; errors name the field. Each field's help is the
    ``adapt-serve`` option's help (``serving/cli.py`` makes the options from these fields)."""

    model: str = knob("llama", "Model to serve: 'llama' (the bundled stories260K, offline), a local HF directory "
                      "or a hub id.")
    rule: str = knob("hebbian", "How each session's fast weights learn while it reads; 'none' serves the plain "
                     "model. Any rule in the registry: adapt_runtime.rules.RULES, and packages' "
                     "'adapt_runtime.rules' entry points.", kind="rule")
    rule_config: JsonObject = knob({}, 'Rule settings as a JSON object, e.g. \'{"lr": 0.01, "chunk_size": 32, '
                                       '"layers": "last:2"}\'.', kind="json", metavar="JSON")
    host: str = knob("127.0.0.1", "Interface to bind. The default answers only this machine; use 0.0.0.0 with "
                     "--api-key.")
    port: int = knob(8000, "TCP port.")
    api_keys: tuple[str, ...] = knob((), "Accepted bearer key (repeat for several). Also read from "
                                     "ADAPT_SERVE_API_KEY. With any key set, every route but /health needs one; "
                                     "sessions belong to the key that made them.", kind="keys", flag="--api-key",
                                     metavar="KEY")
    served_model_name: str | None = knob(None, "Model id shown in /v1/models (default: --model).")
    max_model_len: int | None = knob(None, "Longest context (prompt + answer) in tokens; default: the model's own "
                                     "maximum.")
    max_sessions: int = knob(1024, "Most sessions held (in memory and on disk); creating more answers 429.")
    auto_create_sessions: bool = knob(True, "Create a session on first use of an unknown X-Session-ID (any id of "
                                      "1-128 characters [A-Za-z0-9_.:-]), in the caller's own namespace; with "
                                      "--no-..., only POST /v1/sessions creates.", kind="switch")
    session_memory_budget: int = knob(256 * 2**20, "Bytes of session state kept in memory; least recently used "
                                      "sessions go to disk beyond it.", kind="bytes", metavar="BYTES", shown="256M")
    session_dir: Path | None = knob(None, "Directory where sessions are persisted (written on every turn, reloaded "
                                    "on restart). Without it, evicted sessions go to a temporary directory deleted "
                                    "at exit.", kind="dir")
    session_ttl: float = knob(7 * 24 * 3600.0, "Sessions unused for this long are deleted, files included (e.g. "
                              "3600, 30m, 24h, 7d).", kind="duration", metavar="DURATION", shown="7d")
    max_request_bytes: int = knob(2 * 2**20, "Largest request body; bigger ones answer 413 (state imports get room "
                                  "for one state).", kind="bytes", metavar="BYTES", shown="2M")
    max_concurrent_requests: int = knob(64, "Inference requests in flight at once; more answer 429 with "
                                        "Retry-After.")
    chat_template: str | None = knob(None, "Jinja chat template file; default: the tokenizer's, or a plain "
                                     "'User:/Assistant:' layout.", kind="file")
    dtype: str | None = knob(None, "Model weight dtype; default: the checkpoint's own. Fast weights stay float32.",
                             kind="choice:float32|bfloat16|float16")
    device: str | None = knob(None, "Torch device, e.g. cpu or cuda:0; default cpu.")
    threads: int | None = knob(None, "Torch CPU threads; default: torch's own. Small models decode fastest with 1 "
                               "(extra threads mostly spin, and starve when the machine is shared).")
    max_read_tokens: int = knob(262144, "Most tokens one request may read into a session's memory (POST "
                                "/v1/sessions/{id}/read, and the overflow of a long_prompt request).")
    max_choices_per_request: int = knob(64, "Most choices (prompts x n) one request may ask for; more answer 400.")
    max_tokens_per_request: int = knob(262144, "Most tokens one request may cost (its prompt tokens plus choices x "
                                       "max_tokens); more answer 400.")
    max_sessions_per_key: int | None = knob(None, "Most sessions one API key may hold; more answer 429. Default: a "
                                            "quarter of --max-sessions when several keys are set, else "
                                            "--max-sessions.")
    read_timeout: float = knob(30.0, "Time a client has to send a request's headers, and then its body; slower "
                               "ones are cut off.", kind="duration", metavar="DURATION", shown="30s")
    send_timeout: float = knob(60.0, "Time a client may leave a response (or a stream) unread before the server "
                               "drops it and frees its slot.", kind="duration", metavar="DURATION", shown="60s")
    prefill_chunk: int | None = knob(DEFAULT_PREFILL_CHUNK, "Most prompt tokens read between two decode steps, so "
                                     "a long prompt does not stall the streams that are decoding (read in pieces, "
                                     "round-robin); 0 reads each prompt whole.")
    state_rank: int | None = knob(None, "Hold each session's fast weights as rank-R factors B A (R (d + f) numbers "
                                  "per plastic layer instead of d f): many more sessions fit in "
                                  "--session-memory-budget, at a small quality cost (README, 'Compact state'). "
                                  "Their state files and adapters hold the factors. Default: dense.")
    engine: str = knob("native", "What generates the tokens: 'native' (the runtime's own scheduler; every rule, "
                       "dense or rank-R states) or 'vllm' (vLLM generates with each session's memory as a LoRA "
                       "adapter and the runtime learns each turn's prompt before and its completion after; needs "
                       "vLLM installed and --state-rank R; README, 'vLLM engine').", kind="choice:native|vllm")
    vllm_max_loras: int = knob(8, "With --engine vllm: distinct session adapters in one vLLM batch (vLLM's "
                               "max_loras; it keeps twice as many loaded).")
    vllm_options: JsonObject = knob({}, "With --engine vllm: more vLLM engine arguments as a JSON object "
                                        "(vLLM's AsyncEngineArgs), e.g. '{\"gpu_memory_utilization\": 0.5}'.",
                                        kind="json", metavar="JSON")
    vllm_url: str | None = knob(None, "With --engine vllm: generate with this running 'vllm serve' (its base URL, "
                                "e.g. http://127.0.0.1:8001) instead of vLLM in this process. Start it on the same "
                                "--model folder with --enable-lora --max-lora-rank R and "
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; it must read --vllm-adapter-dir.",
                                metavar="URL")
    vllm_adapter_dir: Path | None = knob(None, "With --engine vllm: where each generation's adapter version is "
                                         "written (default: tmpfs); with --vllm-url, a folder the vLLM server "
                                         "reads too.", kind="dir")

    def __post_init__(self) -> None:
        from adapt_runtime.rules import rule_names  # the registry is the one list of rules

        if self.rule not in rule_names():
            raise ValueError(f"rule: {self.rule!r} is not one of {', '.join(rule_names())}")
        positive = ("max_sessions", "session_memory_budget", "max_request_bytes", "max_concurrent_requests",
                    "max_read_tokens", "vllm_max_loras")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if (self.vllm_url is not None or self.vllm_adapter_dir is not None) and self.engine != "vllm":
            raise ValueError("vllm_url, vllm_adapter_dir: only with --engine vllm")
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
    def patch_options(self) -> JsonObject:
        """The keyword arguments of ``ar.patch`` besides the rule: the rule config, with ``state_rank``."""
        options = dict(self.rule_config)
        if self.state_rank is not None:
            options["state_rank"] = self.state_rank
        return options

    @property
    def model_name(self) -> str:
        """The id clients see in ``/v1/models`` and must send as ``model`` (or omit)."""
        return self.served_model_name or self.model


def parse_rule_config(text: str | None) -> JsonObject:
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
