"""Benchmarks that read the shared datasets say in one line what is missing and where to get it, and exit non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["quality.py", "long_memory_sweep.py", "lora_rank.py", "lowrank_quality.py"])
def test_a_benchmark_without_its_data_exits_with_one_line(script: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "ADAPT_DATA_DIR": str(tmp_path)})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert str(tmp_path) in lines[0] and "ADAPT_DATA_DIR" in lines[0] and "Traceback" not in done.stderr
