"""Build a run's results.json, CSV curves, report.md and plots from its config.json and samples.jsonl."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapt_runtime.eval.atomic import write_json, write_text
from adapt_runtime.eval.config import BASELINE
from adapt_runtime.eval.results import SCHEMA_VERSION, aggregate, read_samples, validate_row
from adapt_runtime.eval.tasks import TASKS
from adapt_runtime.eval.tasks.base import bucket_start

CSV_COLUMNS = ("task", "variant", "shots", "ctx_len", "metric", "x", "rule", "value", "se", "ci_lo", "ci_hi",
               "n", "delta", "delta_lo", "delta_hi")


def fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_estimate(row: dict[str, Any]) -> str:
    ci = row["ci95"]
    return fmt(row["value"]) + ("" if ci is None else f" ± {fmt((ci[1] - ci[0]) / 2)}")


def fmt_delta(row: dict[str, Any]) -> str:
    d = row.get("delta_vs_none")
    if not d or d["value"] is None:
        return "-"
    text = f"{d['value']:+.4f}"
    if d["ci95"] is not None:
        text += f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
    if d.get("rel") is not None:
        text += f" ({100 * d['rel']:+.1f}%)"
    return f"**{text}**" if d.get("excludes_zero") else text


def _table(rows: list[dict[str, Any]], rules: list[str]) -> list[list[str]]:
    """One line per cell: the cell's coordinates, mean ± CI per rule, then Δ vs none per other rule."""
    by_cell: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_cell.setdefault((r["task"], r["variant"], r["shots"], r["ctx_len"], r["metric"]), {})[r["rule"]] = r
    header = ["task", "variant", "shots", "ctx_len", "metric", *rules, *(f"Δ {r}" for r in rules if r != BASELINE)]
    lines = [header]
    for cell, per in by_cell.items():
        lines.append([*("-" if c is None else str(c) for c in cell),
                      *(fmt_estimate(per[r]) if r in per else "-" for r in rules),
                      *(fmt_delta(per[r]) if r in per else "-" for r in rules if r != BASELINE)])
    return lines


def markdown_table(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


def text_table(lines: list[list[str]]) -> str:
    widths = [max(len(line[i].replace("**", "")) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.replace("**", "").ljust(w) for c, w in zip(line, widths)) for line in lines)


def headline_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["task"] in TASKS and r["metric"] == TASKS[r["task"]].headline]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        ci = r["ci95"] or [None, None]
        d = r["delta_vs_none"] or {}
        dci = d.get("ci95") or [None, None]
        w.writerow([r["task"], r["variant"], r["shots"], r["ctx_len"], r["metric"], r.get("x"), r["rule"],
                    r["value"], r["se"], ci[0], ci[1], r["n"], d.get("value"), dci[0], dci[1]])
    write_text(path, buf.getvalue())


def _curve_files(out: Path, metric_rows: list[dict], curve_rows: list[dict]) -> dict[str, str]:
    files: dict[str, list[dict]] = {}
    for r in curve_rows:
        files.setdefault(f"{r['task']}_{r['metric']}", []).append(r)
    for r in metric_rows:
        if r["shots"] is not None:
            files.setdefault(f"{r['task']}_vs_shots", []).append(r)
        if r["task"] == "niah":
            files.setdefault("niah_depth_x_length", []).append(r)
    names = {}
    for name, rows in files.items():
        rows.sort(key=lambda r: (r["variant"], str(r["shots"]), str(r["ctx_len"]), r["metric"],
                                 bucket_start(r["x"]) if r.get("x") else 0))
        write_csv(out / "curves" / f"{name}.csv", rows)
        names[name] = f"curves/{name}.csv"
    write_csv(out / "results.csv", metric_rows)
    return names


def build_report(out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """(Re)build results.json, results.csv, curves/*.csv, report.md and plots/*.png in `out`."""
    meta = json.loads((out / "config.json").read_text())
    rules = meta["config"]["rules"]
    samples = read_samples(out / "samples.jsonl")
    metric_rows, curve_rows = aggregate(samples, rules)
    for r in metric_rows:
        validate_row(r)
    for stale in [*(out / "plots").glob("*.png"), *(out / "curves").glob("*.csv")]:
        stale.unlink()  # derived files of an earlier build; rebuilt below from the samples
    curves = _curve_files(out, metric_rows, curve_rows)
    try:
        from adapt_runtime.eval.plots import make_plots

        plots = make_plots(out / "plots", metric_rows, curve_rows, rules)
    except ImportError:
        plots = []
        log("matplotlib is not installed: plots skipped (pip install 'adapt-runtime[eval]')")
    results = {"schema_version": SCHEMA_VERSION, "config_hash": meta["config_hash"], "model": meta["model"],
               "rules": rules, "data_hashes": meta["data_hashes"], "results": metric_rows,
               "curves": curves, "curve_points": curve_rows, "plots": plots, "timing": meta["timing"]}
    write_json(out / "results.json", results)
    write_text(out / "report.md", render_markdown(meta, metric_rows, rules, plots))
    log(text_table(_table(headline_rows(metric_rows), rules)))
    return results


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]], rules: list[str], plots: list[dict]) -> str:
    c = meta["config"]
    parts = [
        "# adapt-eval report", "",
        f"- model: `{c['model']}` ({meta['model']['fingerprint'][:19]}…)",
        f"- rules: {', '.join(rules)}; chunk size: {c['chunk_size'] or 'rule default'}; "
        f"attention window: {c['attn_window'] or 'full'}",
        f"- episodes per cell: {c['episodes']}; seed: {c['seed']}; preset: {c['preset']}",
        f"- config hash: `{meta['config_hash']}`; wall time: {meta['timing']['wall_s']:.1f} s",
    ]
    if meta.get("command"):
        parts.append(f"- command: `{meta['command']}`")
    parts += ["", "Values are mean ± half-width of the 95% CI over episodes (t-based; an episode with several "
              "queries counts once). Δ is the paired per-episode difference rule − none with its 95% CI "
              "and the relative change; Δs whose CI excludes 0 are in bold. Lower NLL is better; higher acc "
              "is better.", "", "## Headline", "", markdown_table(_table(headline_rows(rows), rules)), ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        t = TASKS.get(task)
        parts += [f"## {task}", "", (t.summary if t else ""), "",
                  f"data hash: `{meta['data_hashes'].get(task, '-')}`", "",
                  markdown_table(_table([r for r in rows if r["task"] == task], rules)), ""]
        parts += [f"![{p['path']}]({p['path']})" for p in plots if p["task"] == task]
        parts.append("")
    return "\n".join(parts)
