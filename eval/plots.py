"""PNG plots: loss vs position with a Δ panel, accuracy vs shots, and the niah depth × length heat map."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from adapt_runtime.eval.config import BASELINE  # noqa: E402
from adapt_runtime.eval.tasks.base import bucket_start  # noqa: E402


def _ci(row: dict[str, Any], key: str | None = None) -> tuple[float, float]:
    src = row if key is None else row[key]
    ci = src["ci95"]
    return (src["value"], src["value"]) if ci is None else (ci[0], ci[1])


def _save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def loss_vs_position(out: Path, rows: list[dict], rules: list[str]) -> list[dict[str, str]]:
    made = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["metric"].startswith("nll_by_pos"):
            groups[(r["task"], r["variant"], r["ctx_len"], r["metric"])].append(r)
    for (task, variant, ctx_len, curve), pts in groups.items():
        log2 = curve.endswith("log2")
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
        for rule in rules:
            rp = sorted((p for p in pts if p["rule"] == rule), key=lambda p: bucket_start(p["x"]))
            if not rp:
                continue
            xs = [max(bucket_start(p["x"]), 1) for p in rp]
            color = f"C{rules.index(rule)}"
            top.plot(xs, [p["value"] for p in rp], marker="o", label=rule, color=color)
            lo, hi = zip(*(_ci(p) for p in rp))
            top.fill_between(xs, lo, hi, alpha=0.2, color=color)
            if rule != BASELINE and all(p["delta_vs_none"] for p in rp):
                bottom.plot(xs, [p["delta_vs_none"]["value"] for p in rp], marker="o", label=rule, color=color)
                lo, hi = zip(*(_ci(p, "delta_vs_none") for p in rp))
                bottom.fill_between(xs, lo, hi, alpha=0.2, color=color)
        bottom.axhline(0.0, color="gray", lw=0.8, ls="--")
        if log2:
            bottom.set_xscale("log", base=2)
            top.set_yscale("log")
        top.set_ylabel("mean NLL (nats)")
        bottom.set_ylabel(f"Δ vs {BASELINE}")
        bottom.set_xlabel("token position (bucket start)")
        top.set_title(f"{task} [{variant}, ctx {ctx_len}]: loss vs position")
        top.legend()
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize=8)
        name = f"loss_vs_position_{task}_{variant}_{ctx_len}_{'log2' if log2 else 'linear'}.png"
        made.append({"task": task, "path": "plots/" + _save(fig, out / name)})
    return made


def acc_vs_shots(out: Path, rows: list[dict], rules: list[str]) -> list[dict[str, str]]:
    made = []
    tasks = sorted({r["task"] for r in rows if r["metric"] == "acc" and r["shots"] is not None})
    for task in tasks:
        pts = [r for r in rows if r["task"] == task and r["shots"] is not None]
        variants = sorted({r["variant"] for r in pts})
        fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 3.6), squeeze=False)
        for ax, variant in zip(axes[0], variants):
            for rule in rules:
                rp = sorted((p for p in pts if p["variant"] == variant and p["rule"] == rule
                             and p["metric"] == "acc"), key=lambda p: p["shots"])
                if rp:
                    lo, hi = zip(*((max(a, 0.0), min(b, 1.0)) for a, b in map(_ci, rp)))
                    ys = [p["value"] for p in rp]
                    err = [[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]]
                    ax.errorbar([p["shots"] for p in rp], ys, yerr=err, marker="o", capsize=3, label=rule,
                                color=f"C{rules.index(rule)}")
            chance = [p for p in pts if p["variant"] == variant and p["metric"] == "chance" and p["rule"] == BASELINE]
            if chance:
                ax.axhline(sum(p["value"] for p in chance) / len(chance), color="gray", ls="--", lw=0.8,
                           label="chance")
            ax.set_xscale("symlog", base=2, linthresh=1)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("shots")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{task} [{variant}]")
            ax.legend(fontsize=8)
        made.append({"task": task, "path": "plots/" + _save(fig, out / f"acc_vs_shots_{task}.png")})
    return made


def niah_heatmap(out: Path, rows: list[dict], rules: list[str]) -> list[dict[str, str]]:
    pts = [r for r in rows if r["task"] == "niah" and r["metric"] == "acc"]
    if not pts:
        return []
    depths = sorted({r["variant"] for r in pts}, key=lambda v: int("".join(ch for ch in v if ch.isdigit()) or 0))
    lengths = sorted({r["ctx_len"] for r in pts})
    made = []
    for rule in rules:
        grid = [[math.nan] * len(lengths) for _ in depths]
        for r in pts:
            if r["rule"] == rule:
                grid[depths.index(r["variant"])][lengths.index(r["ctx_len"])] = r["value"]
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"niah accuracy, rule {rule}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
        made.append({"task": "niah", "path": "plots/" + _save(fig, out / f"niah_heatmap_{rule}.png")})
    return made


def long_memory(out: Path, metric_rows: list[dict], curve_rows: list[dict], rules: list[str]) -> list[dict]:
    """long-memory: per document length, seen-passage NLL vs distance (dashed: the random-direction control);
    and the change vs the fresh state (``none``) of seen / unseen / needle NLL vs document length."""
    made = []
    curves = [r for r in curve_rows if r["task"] == "long-memory"]
    for n in sorted({r["ctx_len"] for r in curves}):
        fig, ax = plt.subplots(figsize=(7, 4))
        for rule in rules:
            for curve, style in (("seen_nll_by_distance", "-"), ("control_seen_nll_by_distance", "--")):
                pts = sorted((r for r in curves if r["ctx_len"] == n and r["rule"] == rule and r["metric"] == curve),
                             key=lambda r: int(r["x"]))
                if pts and (style == "-" or rule != BASELINE):
                    label = rule if style == "-" else f"{rule} control"
                    ax.plot([int(r["x"]) for r in pts], [r["value"] for r in pts], style, marker="o",
                            color=f"C{rules.index(rule)}", label=label)
        ax.set_xlabel("distance from the end of the document (tokens)")
        ax.set_ylabel("seen passage NLL (nats)")
        ax.set_title(f"long-memory, {n}-token document: memory vs distance")
        ax.legend(fontsize=8)
        made.append({"task": "long-memory", "path": "plots/" + _save(fig, out / f"long_memory_distance_{n}.png")})
    pts = [r for r in metric_rows if r["task"] == "long-memory" and r.get("delta_vs_none")]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4))
        for rule in rules[1:]:
            for metric, style in (("seen_nll", "-"), ("unseen_nll", "--"), ("needle_nll", ":")):
                rp = sorted((r for r in pts if r["rule"] == rule and r["metric"] == metric), key=lambda r: r["ctx_len"])
                if rp:
                    ax.plot([r["ctx_len"] for r in rp], [r["delta_vs_none"]["value"] for r in rp], style, marker="o",
                            color=f"C{rules.index(rule)}", label=f"{rule} {metric.split('_')[0]}")
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xlabel("tokens read")
        ax.set_ylabel(f"Δ NLL vs {BASELINE} (fresh state)")
        ax.set_title("long-memory: memory vs document length")
        ax.legend(fontsize=8)
        made.append({"task": "long-memory", "path": "plots/" + _save(fig, out / "long_memory_length.png")})
    return made


def make_plots(out: Path, metric_rows: list[dict], curve_rows: list[dict], rules: list[str]) -> list[dict]:
    """Every plot the rows support; returns [{"task", "path"}] with paths relative to the run folder."""
    return (loss_vs_position(out, curve_rows, rules) + acc_vs_shots(out, metric_rows, rules)
            + niah_heatmap(out, metric_rows, rules) + long_memory(out, metric_rows, curve_rows, rules))
