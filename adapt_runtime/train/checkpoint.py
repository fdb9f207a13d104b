"""``adapt-train`` checkpoints: one folder per saved step, ``OUT/step-000100``, each complete and servable.

A folder holds the model and tokenizer as a plain HF checkpoint (so ``ar.load_model(DIR)`` loads it), the learned
rule (``plasticity.json``, ``plasticity.safetensors``: ``ar.patch(model, rule="learned")`` runs it) and the
training state (``trainer_state.pt``: optimizer, step, RNG states, the sampler's generator; ``train_config.json``).
It is written under a temporary name and renamed into place, so a folder named ``step-*`` is always whole; the
newest one is where ``--resume`` continues.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapt_runtime.train.params import RuleParams

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainerState:
    """What a resume needs beside the model and the rule."""

    step: int
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    sampler: torch.Tensor


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_folders(out: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoint folders in ``out``, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def save_checkpoint(
    out: str | Path,
    step: int,
    model: nn.Module,
    tokenizer,
    rule: RuleParams,
    trainer: TrainerState,
    train_config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``out/step-{step}`` whole (temporary folder, then a rename) and keep the newest ``keep`` folders."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"step-{step:06d}"
    tmp = out / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    rule.config.save(tmp, step=step)
    rule.save(tmp)
    torch.save(
        {"step": trainer.step, "optimizer": trainer.optimizer, "rng": trainer.rng, "sampler": trainer.sampler},
        tmp / STATE_FILE,
    )
    (tmp / CONFIG_FILE).write_text(json.dumps(train_config, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in step_folders(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(folder: str | Path) -> TrainerState:
    data = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    return TrainerState(step=int(data["step"]), optimizer=data["optimizer"], rng=data["rng"], sampler=data["sampler"])


def load_train_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CONFIG_FILE).read_text())
