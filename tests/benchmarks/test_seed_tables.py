"""``benchmarks/seed_tables.py`` on tiny settings: every rule trains and evaluates, and the table sits beside the
published numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
