"""Quality cost of low-rank fast weights (``state_rank``) on the bundled model, next to their speed and size.

    python benchmarks/lowrank_quality.py --windows 16 --threads 2

Held-out windows as in ``benchmarks/quality.py`` (the odd 512-token windows, each read from a fresh state). Every
rule's default configuration runs once dense (exact) and once per rank; the delta of each window's NLL against the
dense run of the same rule is paired per window, with a 95% CI. ``state`` is one session's fast weights in bytes
(dense ``d f``, low-rank ``r (d + f)`` per plastic layer, float32); ``tok/s`` is one row, adapting, on this machine
(after one untimed warm-up window; noisy on a shared CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_data import data_file
from quality import DATASETS, paired, windows

import adapt_runtime as ar


def run(rule: str, wins: list[torch.Tensor], rank: int | None) -> tuple[list[float], float, int]:
    """Per-window NLLs, tokens per second and the largest session state (bytes of S) of one configuration."""
    model, _ = ar.load_model("llama")
    rt = ar.patch(model, rule=rule, state_rank=rank)
    nlls, size = [], 0
    rt.forward(wins[0], rt.new_state())  # warm-up, untimed
    start = time.perf_counter()
    for ids in wins:
        state = rt.new_state()
        logits = rt.forward(ids, state)[0]
        nlls.append(float(F.cross_entropy(logits[:-1], ids[1:])))
        dense = sum(s.numel() * s.element_size() for s in state.S.values() if s is not None)
        factors = sum(t.numel() * t.element_size() for pair in state.factors.values() for t in pair)
        size = max(size, dense + factors)
    secs = time.perf_counter() - start
    rt.unpatch()
    return nlls, sum(len(w) for w in wins) / secs, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows (default 16)")
    parser.add_argument("--data", choices=sorted(DATASETS), default="tinystories")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rules", nargs="+", default=["hebbian", "gradient"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = data_file(args.data)
    _, tokenizer = ar.load_model("llama")
    wins = windows(tokenizer, text, 512, args.windows, "test")
    static, _, _ = run("none", wins, None)
    rows = [{"rule": "none", "rank": None, "nll": sum(static) / len(static), "delta": 0.0, "ci95": 0.0,
             "tok_s": None, "state_bytes": 0}]
    for rule in args.rules:
        dense, tok_s, size = run(rule, wins, None)
        rows.append({"rule": rule, "rank": None, "nll": sum(dense) / len(dense), "delta": 0.0, "ci95": 0.0,
                     "tok_s": tok_s, "state_bytes": size})
        for rank in args.ranks:
            nlls, tok_s, size = run(rule, wins, rank)
            _, delta, ci = paired(dense, nlls)
            rows.append({"rule": rule, "rank": rank, "nll": sum(nlls) / len(nlls), "delta": delta, "ci95": ci,
                         "tok_s": tok_s, "state_bytes": size})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.data}, {len(wins)} held-out windows of 512 tokens")
    print(f"{'rule':9} {'S':>6} {'mean NLL':>9} {'vs dense (nats)':>16} {'95% CI':>9} {'tok/s':>7} {'state':>9}")
    for r in rows:
        tok_s = "" if r["tok_s"] is None else f"{r['tok_s']:.0f}"
        kind = "dense" if r["rank"] is None else f"r={r['rank']}"
        print(f"{r['rule']:9} {kind:>6} {r['nll']:>9.4f} {r['delta']:>+16.4f} {'+-' + format(r['ci95'], '.4f'):>9} "
              f"{tok_s:>7} {r['state_bytes'] / 1024:>7.1f}KiB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
