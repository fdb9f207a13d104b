"""Quality of the rules on real text: mean next-token NLL over 512-token windows, static vs plastic.

    python benchmarks/quality.py                      # defaults of each rule, TinyStories + WikiText-2 held-out windows
    python benchmarks/quality.py --sweep --out runs/sweep.json   # the sweep that chose the defaults (tune windows)

Windows: the text is tokenized once, cut into consecutive windows of --window-len tokens (BOS first). Even windows
are the tune split (the sweep reads only these), odd windows the test split (the reported table). Every rule scores
the identical windows from a fresh state; the delta is paired per window with a 95% CI.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_data import SOURCES, data_file
from long_memory_sweep import parse_config
from tqdm import tqdm

import adapt_runtime as ar

DATASETS = tuple(SOURCES)


def windows(tokenizer, path: Path, length: int, count: int, split: str) -> list[torch.Tensor]:
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    body = length - 1
    cut = [ids[i : i + body] for i in range(0, len(ids) - body, body)]
    cut = cut[0::2] if split == "tune" else cut[1::2]
    stride = max(1, len(cut) // count)
    bos = tokenizer.bos_token_id
    return [torch.tensor([bos, *w]) for w in cut[::stride][:count]]


def window_nll(rt: ar.Runtime, ids: torch.Tensor) -> float:
    logits = rt.forward(ids, rt.new_state())[0]
    return float(F.cross_entropy(logits[:-1], ids[1:]))


def score(rule: str, wins: list[torch.Tensor], desc: str = "", **kwargs) -> tuple[list[float], float]:
    model, _ = ar.load_model("llama")
    rt = ar.patch(model, rule=rule, **kwargs)
    start = time.perf_counter()
    nlls = [window_nll(rt, w) for w in tqdm(wins, desc=desc or rule, leave=False)]
    return nlls, time.perf_counter() - start


def paired(base: list[float], other: list[float]) -> tuple[float, float, float]:
    """Mean relative change of the mean NLL, and the 95% CI half-width of the paired per-window delta."""
    deltas = [o - b for b, o in zip(base, other)]
    n = len(deltas)
    mean = sum(deltas) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / max(n - 1, 1))
    return mean / (sum(base) / n), mean, 1.96 * sd / math.sqrt(n)


def sweep(tokenizer, count: int) -> list[dict]:
    wins = windows(tokenizer, data_file("tinystories"), 512, count, "tune")
    base, _ = score("none", wins)
    rows = []

    def run(rule: str, **kw) -> dict:
        nlls, secs = score(rule, wins, desc=f"{rule} {kw}", **kw)
        rel, delta, ci = paired(base, nlls)
        row = {"rule": rule, **kw, "nll": sum(nlls) / len(nlls), "rel": rel, "delta": delta, "ci95": ci, "secs": secs}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    for lr in (0.4, 0.8, 1.2, 1.6, 2.4):
        run("gradient", lr=lr)
    rates = {"error": (0.5, 1.0, 2.0, 3.0, 4.0, 6.0), "next_token": (0.05, 0.1, 0.25, 0.5),
             "output": (0.05, 0.1, 0.25, 0.5)}
    for target, modulation in itertools.product(rates, ("none", "surprise")):
        for lr in rates[target]:
            run("hebbian", target=target, modulation=modulation, lr=lr)
    best = min((r for r in rows if r["rule"] == "hebbian"), key=lambda r: r["nll"])
    for norm_jacobian in (False,):
        run("hebbian", target=best["target"], modulation=best["modulation"], lr=best["lr"], norm_jacobian=norm_jacobian)
    for decay, layers in itertools.product((1.0, 0.9), ("all", "last:2", "every:2")):
        run("hebbian", target=best["target"], modulation=best["modulation"], lr=best["lr"], decay=decay,
            layers=layers)
    for decay, layers in itertools.product((1.0, 0.9), ("all", "last:2")):
        grad_best = min((r for r in rows if r["rule"] == "gradient"), key=lambda r: r["nll"])
        run("gradient", lr=grad_best["lr"], decay=decay, layers=layers)
    return rows


def report(tokenizer, count: int, rules: tuple[str, ...] = ("hebbian", "gradient")) -> list[dict]:
    rows = []
    for name in DATASETS:
        wins = windows(tokenizer, data_file(name), 512, count, "test")
        base, base_secs = score("none", wins)
        rows.append({"data": name, "rule": "none", "nll": sum(base) / len(base), "rel": 0.0, "ci95": 0.0,
                     "secs": base_secs, "n": len(wins)})
        for variant in rules:
            rule, _, options = variant.partition(":")
            nlls, secs = score(rule, wins, variant, **parse_config(options))
            rel, _, ci = paired(base, nlls)
            rows.append({"data": name, "rule": variant, "nll": sum(nlls) / len(nlls), "rel": rel, "ci95": ci,
                         "secs": secs, "n": len(wins)})
    width = max(9, *(len(r["rule"]) for r in rows))
    print(f"\n{'data':12} {'rule':{width}} {'n':>4} {'mean NLL':>9} {'vs static':>10} {'95% CI (nats)':>14} "
          f"{'time':>7}")
    for r in rows:
        print(f"{r['data']:12} {r['rule']:{width}} {r['n']:>4} {r['nll']:>9.4f} {100 * r['rel']:>9.2f}% "
              f"{'+-' + format(r['ci95'], '.4f'):>14} {r['secs']:>6.1f}s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="run the defaults sweep on the tune windows")
    parser.add_argument("--windows", type=int, default=64, help="windows per dataset (default 64)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rules", nargs="+", default=["hebbian", "gradient"],
                        help='rules of the report besides static, each a rule at its defaults or RULE:OPTIONS with '
                             'ar.patch options as long_memory_sweep.py takes them, e.g. '
                             '"hebbian:write_form=plain,norm_bound=0.05" (the defaults before 2026-12-05)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("tinystories",) if args.sweep else DATASETS:
        data_file(name)  # a missing dataset stops the run here, before any work
    _, tokenizer = ar.load_model("llama")
    rows = sweep(tokenizer, args.windows) if args.sweep else report(tokenizer, args.windows, tuple(args.rules))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
