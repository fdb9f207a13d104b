"""Run every rule on the identical episodes of every task and write config.json, env.json, samples.jsonl.

One model is loaded and patched per rule (the runtime's `none` rule is the baseline: the patched model
equals the base model). Each episode gets a fresh state. The report (results.json, curves, report.md,
plots) is built from these files by `adapt_runtime.eval.report.build_report`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from adapt_runtime.eval.atomic import write_json
from adapt_runtime.eval.config import BASELINE, ConfigError, RunConfig, config_hash, split_rule
from adapt_runtime.eval.episode import Episode, data_hash
from adapt_runtime.eval.scoring import score_episode
from adapt_runtime.eval.tasks import TaskSpec, get_task
from tqdm.auto import tqdm

from adapt_runtime.atomic import atomic_open

RUN_FILES = ("config.json", "samples.jsonl", "results.json", "report.md")


def clean(x: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None, tuples become lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over each tensor's name, shape, dtype and float64 sum: cheap, and changes with the weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{float(t.double().sum()):.12e};".encode())
    return "sha256:" + h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _needed(ep: Episode) -> int:
    """Attention positions the longest turn needs, counting multiple-choice forks (a candidate is fed
    from its query's start, so one longer than the gold answer reaches further)."""
    starts = [0, *ep.breaks]
    need = max(ep.turn_lengths())
    for q in ep.queries:
        turn_start = max(s for s in starts if s <= q.start)
        for c in q.candidates:
            need = max(need, q.start - turn_start + len(c) - 1)
    return need


def make_episodes(config: RunConfig, tokenizer: Any, max_length: int,
                  log: Callable[[str], None] = print) -> dict[str, list[Episode]]:
    """Every task's episodes, generated once and shared by all rules. Without --attn-window, a cell
    (variant, shots, ctx_len) whose episodes exceed the model's context is dropped with a note."""
    spec = TaskSpec(encode=lambda s: tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"],
                    bos_id=tokenizer.bos_token_id, max_length=max_length, episodes=config.episodes,
                    seed=config.seed, shots=config.shots, ctx_lens=config.ctx_lens,
                    data=Path(config.data) if config.data else None)
    if config.attn_window is not None and config.attn_window > max_length:
        raise ConfigError(f"--attn-window {config.attn_window} is over the model's {max_length} positions")
    out = {}
    for name in config.tasks:
        eps = get_task(name).episodes(spec)
        if config.attn_window is None:
            too_long = {ep.cell for ep in eps if _needed(ep) > max_length}
            for cell in sorted(too_long, key=str):
                log(f"note: {name} variant={cell[1]} shots={cell[2]} ctx_len={cell[3]} needs more than the "
                    f"model's {max_length} positions: skipped (pass --attn-window W to run it block-local)")
            eps = [ep for ep in eps if ep.cell not in too_long]
        if not eps:
            raise ConfigError(f"--task {name}: no episodes fit these settings")
        out[name] = eps
    return out


def run_rule(rt: Any, rule: str, episodes: dict[str, list[Episode]], attn_window: int | None,
             progress: bool = True) -> Iterator[dict[str, Any]]:
    """Score every episode under one patched runtime; yields one sample row per episode."""
    base, frozen = split_rule(rule)
    adapt = base != BASELINE
    for name, eps in episodes.items():
        task = get_task(name)
        if frozen and hasattr(task, "score"):
            raise ConfigError(f"{rule}: task {name} scores its own way; frozen turns take teacher-forced tasks")
        for ep in tqdm(eps, desc=f"{rule:>10s} {name}", disable=not progress, leave=False):
            t0 = time.perf_counter()
            scorer = getattr(task, "score", score_episode)  # a task may score its own way (long-memory reads)
            extra = {"frozen_turns": True} if frozen else {}
            score = scorer(rt, rt.new_state(), ep, adapt=adapt, window=attn_window, **extra)
            m = task.measure(ep, score)
            yield clean({
                "rule": rule, "task": ep.task, "variant": ep.variant, "shots": ep.shots, "ctx_len": ep.ctx_len,
                "episode": ep.index, "seed": ep.seed, "tokens": len(ep.tokens), "metrics": m.metrics,
                "curves": m.curves, "fingerprint": ep.fingerprint()[:16],
                "queries": [{"start": q.start, "end": q.end, "distance": q.distance, "gold": q.gold,
                             "correct": s.correct, "logprobs": s.logprobs}
                            for q, s in zip(ep.queries, score.queries)],
                "seconds": time.perf_counter() - t0,
            })


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if not overwrite and any((out / f).exists() for f in RUN_FILES):
        raise ConfigError(f"--out {out}: already holds a run; choose a new folder or pass --overwrite")


def environment() -> dict[str, Any]:
    import transformers

    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(), "device": "cpu",
            "cpu_count": os.cpu_count(), "deterministic": torch.are_deterministic_algorithms_enabled()}


def run(config: RunConfig, out: Path, overwrite: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, command: str | None = None) -> Path:
    """Run the configured evaluation into `out` and build its report; returns `out`."""
    import adapt_runtime as ar

    check_out_dir(out, overwrite)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    data_sha = file_sha256(Path(config.data)) if config.data and Path(config.data).is_file() else None
    started = time.time()
    episodes: dict[str, list[Episode]] = {}
    runtimes: dict[str, Any] = {}
    fingerprint = ""
    timing: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "samples.jsonl", "w") as f:
        for rule in config.rules:
            model, tokenizer = ar.load_model(config.model)
            if not episodes:
                fingerprint = model_fingerprint(model)
            rt = ar.patch(model, rule=split_rule(rule)[0], **config.patch_kwargs(rule))
            if not episodes:
                episodes = make_episodes(config, tokenizer, rt.max_length, log)
                log(f"{sum(map(len, episodes.values()))} episodes over {len(episodes)} task(s); "
                    f"rules: {', '.join(config.rules)}")
            runtimes[rule] = rt.config.to_dict()
            t0 = time.perf_counter()
            for row in run_rule(rt, rule, episodes, config.attn_window, progress):
                f.write(json.dumps(row) + "\n")
            timing[rule] = time.perf_counter() - t0
            rt.unpatch()
    write_json(out / "config.json", clean({
        "config": config.to_dict(),
        "config_hash": config_hash(config, fingerprint, data_sha),
        "command": command,
        "model": {"name": config.model, "fingerprint": fingerprint},
        "runtime_configs": runtimes,
        "data_file_sha256": data_sha,
        "data_hashes": {name: data_hash(eps) for name, eps in episodes.items()},
        "episodes": {name: len(eps) for name, eps in episodes.items()},
        "timing": {"wall_s": time.time() - started, "per_rule_s": timing},
    }))
    write_json(out / "env.json", environment())
    from adapt_runtime.eval.report import build_report

    build_report(out, log=log)
    return out
