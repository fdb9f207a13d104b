"""From per-episode samples to flat result rows: mean ± 95% CI per rule, paired delta vs `none`.

A cell is (task, variant, shots, ctx_len, metric), plus (curve, x) for curve points. Every rule's value
for a cell is paired with the baseline's on the same episode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapt_runtime.eval.config import BASELINE
from adapt_runtime.eval.stats import mean_ci, paired_delta

SCHEMA_VERSION = 1
ROW_KEYS = ("task", "variant", "rule", "shots", "ctx_len", "metric", "value", "se", "ci95", "n", "delta_vs_none")

Cell = tuple[Any, ...]


def read_samples(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
    return rows


def _collect(samples: Iterable[dict[str, Any]], curves: bool) -> dict[Cell, dict[str, dict[int, float]]]:
    """{cell: {rule: {episode: value}}}, in first-seen order."""
    cells: dict[Cell, dict[str, dict[int, float]]] = {}
    for s in samples:
        base = (s["task"], s["variant"], s["shots"], s["ctx_len"])
        items: list[tuple[Cell, float | None]]
        if curves:
            items = [((*base, c, x), v) for c, pts in s.get("curves", {}).items() for x, v in pts.items()]
        else:
            items = [((*base, m), v) for m, v in s["metrics"].items()]
        for cell, v in items:
            cells.setdefault(cell, {}).setdefault(s["rule"], {})[s["episode"]] = math.nan if v is None else v
    return cells


def _row(cell: Cell, rule: str, per_rule: dict[str, dict[int, float]]) -> dict[str, Any]:
    est = mean_ci(per_rule[rule].values())
    row = {"task": cell[0], "variant": cell[1], "rule": rule, "shots": cell[2], "ctx_len": cell[3],
           "metric": cell[4], **est.to_dict()}
    if BASELINE in per_rule:
        d = paired_delta(per_rule[BASELINE], per_rule[rule])
        base = mean_ci(per_rule[BASELINE].values()).mean
        rel = d.mean / base if base and math.isfinite(base) and math.isfinite(d.mean) else None
        row["delta_vs_none"] = {**d.to_dict(), "rel": rel, "excludes_zero": d.excludes_zero}
    else:
        row["delta_vs_none"] = None
    return row


def aggregate(samples: list[dict[str, Any]], rules: list[str]) -> tuple[list[dict], list[dict]]:
    """(metric rows, curve rows); curve rows carry "curve" and "x" and name the curve in "metric"."""
    metric_rows = [_row(cell, r, per) for cell, per in _collect(samples, False).items() for r in rules if r in per]
    curve_rows = []
    for cell, per in _collect(samples, True).items():
        for r in rules:
            if r in per:
                row = _row((*cell[:4], cell[4]), r, per)
                row["x"] = cell[5]
                curve_rows.append(row)
    return metric_rows, curve_rows


def validate_row(row: dict[str, Any]) -> None:
    """Raise ValueError if a result row misses a key or has a malformed value (the results.json schema)."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"result row misses {missing}")
    for k in ("task", "variant", "rule", "metric"):
        if not isinstance(row[k], str):
            raise ValueError(f"result row {k}={row[k]!r} is not a string")
    for k in ("shots", "ctx_len"):
        if row[k] is not None and not isinstance(row[k], int):
            raise ValueError(f"result row {k}={row[k]!r} is not an int or null")
    if not isinstance(row["n"], int) or row["n"] < 0:
        raise ValueError(f"result row n={row['n']!r}")
    for ci in (row["ci95"], (row["delta_vs_none"] or {}).get("ci95")):
        if ci is not None and not (len(ci) == 2 and ci[0] <= ci[1]):
            raise ValueError(f"result row ci95={ci!r} is not [lo, hi]")
    d = row["delta_vs_none"]
    if d is not None and not {"value", "ci95", "n"} <= set(d):
        raise ValueError(f"delta_vs_none {d!r} misses value/ci95/n")
