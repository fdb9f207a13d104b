"""``benchmarks/seed_tables.py`` on tiny settings: every rule trains and evaluates, and the table sits beside the
published numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def test_seed_tables_tiny_run_prints_the_side_by_side_table(tmp_path: Path) -> None:
    out = tmp_path / "seed.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "seed_tables.py"),
        "--task",
        "copy",
        "--seeds",
        "1",
        "--episodes",
        "1",
        "--epochs",
        "1",
        "--eval-episodes",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:6] for line in done.stdout.splitlines() if line.startswith("| copy")]
    cells = {(r[1].strip(), r[2].strip()): r[4].strip() for r in rows}
    assert cells[("loss", "none")] == "0.415" and cells[("recall", "gradient")] == "0.745"
    assert {rule for _, rule in cells} == {"none", "hebbian", "gradient"}
    results = json.loads(out.read_text())["results"]["copy"]
    assert results["none"][0]["final"]["plastic_sq_norm"] == 0.0
    assert results["hebbian"][0]["final"]["plastic_sq_norm"] > 0.0  # the plastic rules wrote
    assert results["gradient"][0]["final"]["plastic_sq_norm"] > 0.0


# ---- Omniglot 5-way 5-shot and Duan et al.'s sequence reproduction, in-process on tiny settings --------------------

sys.path.insert(0, str(ROOT / "benchmarks"))
import seed_omniglot  # noqa: E402
import seed_tables  # noqa: E402

needs_omniglot = pytest.mark.skipif(
    not seed_omniglot.available(), reason="shared/data/omniglot (the two small background zips) is not beside the repo"
)


def test_help_names_every_task() -> None:
    done = CliRunner().invoke(seed_tables.main, ["--help"])
    assert done.exit_code == 0, done.output
    for name in ("copy", "regression", "cue", "omniglot", "seqrep"):
        assert f"  {name} " in done.output


@needs_omniglot
def test_omniglot_split_keeps_test_alphabets_out_of_training() -> None:
    assert seed_omniglot.split_summary(seed_omniglot.DEFAULT_DIR, 28) == {"train": 136, "test": 106}
    g = torch.Generator().manual_seed(0)
    (images, tags), targets = seed_omniglot.episodes(2, g, "test", size=28)
    assert images.shape == (2, 100, 1, 28, 28) and tags.shape == (2, 100, 6)
    assert -1.0 <= float(images.min()) < float(images.max()) <= 1.0
    assert (targets[:, :25] == -100).all() and targets[0, 25:].tolist() == [c for c in range(5) for _ in range(15)]
    assert (tags[:, :25, :5].argmax(-1) == torch.arange(5).repeat_interleave(5)).all()
    assert (tags[:, :25, 5] == 0).all() and (tags[:, 25:, 5] == 1).all() and (tags[:, 25:, :5] == 0).all()
    g = torch.Generator().manual_seed(0)
    (shuffled, _), mixed = seed_omniglot.episodes(2, g, "test", size=28, shuffle_queries=True)
    assert torch.equal(shuffled[0, :25], images[0, :25])  # the first episode's draws, its queries reordered
    assert mixed[0, 25:].bincount().tolist() == [15] * 5 and mixed[0, 25:].tolist() != targets[0, 25:].tolist()
    for j in range(25, 100):  # each query image keeps its label
        src = next(k for k in range(25, 100) if torch.equal(images[0, k], shuffled[0, j]))
        assert targets[0, src] == mixed[0, j]


@needs_omniglot
def test_omniglot_every_rule_trains_and_scores_the_queries() -> None:
    task = seed_tables.TASKS["omniglot"]

    def make(n, g, split):  # 5-way 1-shot, 1 query per class: 10 steps
        return seed_omniglot.episodes(n, g, split, size=28, shots=1, queries=1)

    for rule in seed_tables.RULES:
        result = seed_tables.run(task, rule, 0, 1, 1, 1, 2, None, make, image_size=28)
        final = result["final"]
        assert 0.0 <= final["accuracy"] <= 1.0 and math.isfinite(final["loss"])
        assert (final["plastic_sq_norm"] > 0.0) == (rule != "none")
    assert task.published["hebbian"]["accuracy"] == 0.237


def test_seqrep_episodes_and_every_rule() -> None:
    g = torch.Generator().manual_seed(0)
    inputs, targets = seed_tables.seqrep_episodes(3, g)
    assert inputs.shape == (3, 30, 3) and targets.shape == (3, 30)
    assert torch.equal(targets[:, 25:], inputs[:, :5, 0]) and (targets[:, :25] == 0).all()
    assert (inputs[:, :5, 1] == 1).all() and (inputs[:, 25:, 2] == 1).all() and (inputs[:, 5:25] == 0).all()
    task = seed_tables.TASKS["seqrep"]
    assert task.backbone == "llama" and task.published == {}
    for rule in seed_tables.RULES:
        result = seed_tables.run(task, rule, 0, 2, 1, 2, 4, None)
        final = result["final"]
        assert math.isfinite(final["test_mse"]) and (final["plastic_sq_norm"] > 0.0) == (rule != "none")
