"""Pair rules across ``adapt-eval`` runs of different models on the same episodes, e.g. a trained checkpoint's
``learned`` rule against the frozen model's ``none``, ``hebbian`` and ``gradient``.

    adapt-eval run --model llama --rules none,hebbian,gradient --data heldout.txt ... --out runs/frozen
    adapt-eval run --model runs/a/step-000240 --rules none,learned --data heldout.txt ... --out runs/a
    python benchmarks/paired_runs.py frozen=runs/frozen a=runs/a --base frozen:none --versus frozen:gradient

``adapt-eval`` pairs every rule with ``none`` of its own run (its own model). Here a row is ``LABEL:RULE`` of any
run given as ``LABEL=DIR``, and every delta pairs it with the ``--base`` row (and ``--versus``, if given) on the
same episode: the same task, variant, shots, context length and episode index, whose token fingerprint must be the
same in both runs (the runs must share --data, --seed, --episodes and the tokenizer; the script stops otherwise).
Each cell: mean ± the half-width of its 95% CI over episodes; a delta: the mean of the per-episode differences with
its 95% CI and the change relative to the base mean (``adapt_runtime.eval.stats``, as ``adapt-eval`` reports them).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from adapt_runtime.eval.results import read_samples
from adapt_runtime.eval.stats import mean_ci, paired_delta

# per task, the metrics shown by default (those a run holds)
METRICS = {
    "longdoc-ppl": ("nll",),
    "session-memory": ("nll",),
    "long-memory": ("seen_nll", "unseen_nll", "needle_nll", "needle_acc", "seen_vs_control"),
}


def load_runs(specs: list[str]) -> dict[str, list[dict]]:
    runs = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or ":" in label:
            sys.exit(f"paired_runs.py: expected LABEL=DIR (a label without ':'), got {spec!r}")
        path = Path(folder) / "samples.jsonl"
        if not path.is_file():
            sys.exit(f"paired_runs.py: {path}: no such file; is {folder} an adapt-eval run folder?")
        runs[label] = read_samples(path)
    return runs


def collect(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    """({(cell, metric): {row: {episode: value}}}, {(cell, episode): fingerprint}); a cell is
    (task, variant, shots, ctx_len), a row ``LABEL:RULE``."""
    values: dict = {}
    prints: dict = {}
    for label, samples in runs.items():
        for s in samples:
            cell = (s["task"], s["variant"], s["shots"], s["ctx_len"])
            key = (cell, s["episode"])
            if prints.setdefault(key, s["fingerprint"]) != s["fingerprint"]:
                sys.exit(f"paired_runs.py: run {label!r} has another episode {s['episode']} of {cell} (other tokens); "
                         "the runs must share --data, --seed, --episodes and the tokenizer")
            for metric, v in s["metrics"].items():
                row = values.setdefault((cell, metric), {}).setdefault(f"{label}:{s['rule']}", {})
                row[s["episode"]] = math.nan if v is None else v
    return values, prints


def fmt_delta(base: dict, other: dict) -> str:
    d = paired_delta(base, other)
    if d.n == 0:
        return "-"
    ref = mean_ci(base.values()).mean
    rel = f" ({100 * d.mean / ref:+.1f}%)" if ref and math.isfinite(ref) else ""
    ci = f" [{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}]" if d.ci95 else ""
    text = f"{d.mean:+.4f}{ci}{rel}"
    return f"**{text}**" if d.excludes_zero else text


def table(values: dict, rows: list[str], base: str, versus: str | None, metrics: dict[str, tuple[str, ...]]) -> str:
    head = ["task", "variant", "ctx_len", "metric", "row", "n", "mean ± 95% CI", f"Δ vs {base} [95% CI]"]
    head += [f"Δ vs {versus} [95% CI]"] if versus else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (cell, metric), per_row in values.items():
        if metric not in metrics.get(cell[0], ()):
            continue
        for row in rows:
            if row not in per_row:
                continue
            est = mean_ci(per_row[row].values())
            half = f" ± {est.ci95[1] - est.mean:.4f}" if est.ci95 else ""
            cells = [cell[0], cell[1], str(cell[3]), metric, row, str(est.n), f"{est.mean:.4f}{half}",
                     fmt_delta(per_row[base], per_row[row]) if base in per_row and row != base else ""]
            if versus:
                cells.append(fmt_delta(per_row[versus], per_row[row]) if versus in per_row and row != versus else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=DIR, an adapt-eval run folder under a short label")
    ap.add_argument("--base", required=True, help="the row every delta pairs with, LABEL:RULE (e.g. frozen:none)")
    ap.add_argument("--versus", default=None, help="a second row to pair with, LABEL:RULE (e.g. frozen:gradient)")
    ap.add_argument("--rows", default=None, help="comma list of LABEL:RULE rows, in order (default: all)")
    ap.add_argument("--metrics", default=None, help="comma list of metrics to show (default: per task, "
                    + "; ".join(f"{t}: {', '.join(m)}" for t, m in METRICS.items()) + ")")
    args = ap.parse_args(argv)
    runs = load_runs(args.runs)
    values, _ = collect(runs)
    known = {row for per_row in values.values() for row in per_row}
    rows = args.rows.split(",") if args.rows else sorted(known, key=lambda r: (list(runs).index(r.split(":")[0]), r))
    for row in [*rows, args.base, *([args.versus] if args.versus else [])]:
        if row not in known:
            sys.exit(f"paired_runs.py: no row {row!r}; the runs hold {', '.join(sorted(known))}")
    metrics = METRICS
    if args.metrics:
        chosen = tuple(args.metrics.split(","))
        metrics = {cell[0]: chosen for cell, _ in values}
    print(table(values, rows, args.base, args.versus, metrics))


if __name__ == "__main__":
    main()
