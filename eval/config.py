"""The resolved configuration of one adapt-eval run, its presets, and its hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from adapt_runtime.eval.tasks import TASKS

HARNESS_VERSION = "1"
BASELINE = "none"
ENGINE_SUFFIX = "@vllm"  # "hebbian@vllm": the rule scored as `adapt-serve --engine vllm` generates (frozen turns)


def split_rule(name: str) -> tuple[str, bool]:
    """``"hebbian@vllm"`` -> ``("hebbian", True)``: the runtime's rule, and whether turns are scored frozen."""
    if name.endswith(ENGINE_SUFFIX):
        return name.removesuffix(ENGINE_SUFFIX), True
    return name, False


@dataclass(frozen=True)
class Preset:
    """Defaults a preset fills in; explicit flags win."""

    tasks: tuple[str, ...]
    episodes: int
    shots: tuple[int, ...]
    ctx_lens: tuple[int, ...] | None


PRESETS: dict[str, Preset] = {
    # CI: a few short episodes of the text tasks and one synthetic task, about a minute on 2 CPU cores.
    "smoke": Preset(("longdoc-ppl", "session-memory", "assoc-recall"), 3, (0, 4), (128,)),
    # A human's first look: every task that needs no data file, 20 episodes per cell.
    "quick": Preset(tuple(n for n, t in TASKS.items() if t.data != "required" and getattr(t, "quick", True)), 20,
                    (0, 1, 4, 16), None),
    "full": Preset(tuple(TASKS), 100, (0, 1, 2, 4, 8, 16, 32), None),
}


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the flag."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's numbers (the output directory aside)."""

    model: str
    rules: tuple[str, ...]
    tasks: tuple[str, ...]
    episodes: int
    seed: int = 0
    shots: tuple[int, ...] | None = None
    ctx_lens: tuple[int, ...] | None = None
    data: str | None = None
    chunk_size: int | None = None
    attn_window: int | None = None
    rule_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    preset: str = "quick"

    def __post_init__(self) -> None:
        if not self.rules:
            raise ConfigError("--rules: give at least one rule")
        if len(set(self.rules)) != len(self.rules):
            raise ConfigError(f"--rules: a rule is listed twice: {','.join(self.rules)}")
        if self.rules[0] != BASELINE:
            raise ConfigError(f"--rules: the first rule must be {BASELINE!r} (deltas are paired against it)")
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"--task: unknown task {t!r}; known: {', '.join(TASKS)}")
            if TASKS[t].data == "required" and self.data is None:
                raise ConfigError(f"--task {t} reads a local file: pass --data")
        if not self.tasks:
            raise ConfigError("--task: give at least one task")
        if self.episodes < 1:
            raise ConfigError("--episodes must be >= 1")
        for name, v in (("--chunk-size", self.chunk_size), ("--attn-window", self.attn_window)):
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1")
        if any(k < 0 for k in self.shots or ()):
            raise ConfigError("--shots must be >= 0")
        if any(c < 8 for c in self.ctx_lens or ()):
            raise ConfigError("--ctx-len must be >= 8")
        for rule, opts in self.rule_config.items():
            if rule not in self.rules:
                raise ConfigError(f"--rule-config names {rule!r}, which is not in --rules")
            if not isinstance(opts, dict):
                raise ConfigError(f"--rule-config[{rule!r}] must be an object of patch options")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("rules", "tasks", "shots", "ctx_lens"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    def patch_kwargs(self, rule: str) -> dict[str, Any]:
        """Keyword arguments for ar.patch under `rule` (chunk size, then the rule's own options)."""
        kw: dict[str, Any] = {} if self.chunk_size is None else {"chunk_size": self.chunk_size}
        return {**kw, **self.rule_config.get(rule, {})}

    @classmethod
    def from_preset(cls, preset: str, **explicit: Any) -> RunConfig:
        """A config whose unset fields (None) come from the preset."""
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        p = PRESETS[preset]
        given = {k: v for k, v in explicit.items() if v is not None}
        tasks = p.tasks if given.get("data") else tuple(t for t in p.tasks if TASKS[t].data != "required")
        fields: dict[str, Any] = {"tasks": tasks, "episodes": p.episodes, "shots": p.shots,
                                  "ctx_lens": p.ctx_lens, "preset": preset}
        return cls(**{**fields, **given})


def config_hash(config: RunConfig, model_fingerprint: str, data_sha: str | None) -> str:
    """sha256 over the canonical config, the model's fingerprint, the data file and the harness version."""
    body = {"config": config.to_dict(), "model": model_fingerprint, "data": data_sha, "harness": HARNESS_VERSION}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
