"""``benchmarks/scale.py --quick`` runs in seconds and prints issue 9's table with every rule and state kind."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the quick shape: hidden 64, intermediate 128, 2 layers (all plastic), fp32; compact rank 16
DENSE_BYTES = 2 * 64 * 128 * 4
RANK16_BYTES = 2 * 16 * (64 + 128) * 4


def test_scale_quick_prints_every_rule_and_state_kind(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--no-progress",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].split("|")[1:4] == [" B ", " rule ", " state "]
    cells = {tuple(c.strip() for c in line.strip().strip("|").split("|")[:3]) for line in lines[1:]}
    expected = {(b, "none", "-") for b in ("1", "4")}
    expected |= {(b, rule, state) for b in ("1", "4") for rule in ("hebbian", "gradient")
                 for state in ("dense", "r=16")}
    assert cells == expected
    assert "dense S bound" in done.stdout and "GB/s read" in done.stdout

    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(expected)
    for row in rows:
        for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["rule"], row["state"], key)
    assert {r["state_bytes"] for r in rows if r["state"] == "dense"} == {DENSE_BYTES}
    assert {r["state_bytes"] for r in rows if r["state"] == "r=16"} == {RANK16_BYTES}
    assert {r["state_bytes"] for r in rows if r["rule"] == "none"} == {0}
