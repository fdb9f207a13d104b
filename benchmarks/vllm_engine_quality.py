"""What ``adapt-serve --engine vllm`` costs in quality: the native engine against the vLLM engine's semantics, paired.

    python benchmarks/vllm_engine_quality.py                       # session-memory, 40 episodes, rank 16
    python benchmarks/vllm_engine_quality.py --episodes 10 --ctx-len 128

The vLLM engine generates a completion with S fixed and learns it after; the native engine writes each chunk the
completion completes as it goes. On the same episodes ``adapt-eval`` scores the rule both ways (``hebbian`` and
``hebbian@vllm``: each turn after the first scored with S fixed as it began, then learned), with rank-R states on
every layer (the vLLM engine's configuration), and this prints each against the ``none`` baseline and the paired
difference vLLM engine - native with its 95% CI, per variant (seen / unseen) of the session-memory task. Both
sides run the runtime (tests/vllm holds vLLM's outputs to the runtime's within 1e-3 nats), so the difference is the
semantics alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from adapt_runtime.eval.config import RunConfig
from adapt_runtime.eval.harness import run
from adapt_runtime.eval.stats import paired_delta
from bench_data import data_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="hebbian", help="the plastic rule")
    parser.add_argument("--rank", type=int, default=16, help="state rank (the vLLM engine needs one)")
    parser.add_argument("--episodes", type=int, default=40, help="episodes per variant")
    parser.add_argument("--ctx-len", type=int, default=256, help="tokens per turn")
    parser.add_argument("--source", default="tinystories", help="validation text (bench_data's names)")
    args = parser.parse_args()
    options = {"state_rank": args.rank, "layers": "all"}
    rules = ("none", args.rule, f"{args.rule}@vllm")
    config = RunConfig(model="llama", rules=rules, tasks=("session-memory",), episodes=args.episodes,
                       ctx_lens=(args.ctx_len,), data=str(data_file(args.source)), preset="smoke",
                       rule_config={args.rule: options, f"{args.rule}@vllm": options})
    with tempfile.TemporaryDirectory(prefix="vllm-quality-") as work:
        run(config, Path(work) / "run", log=lambda _: None)
        rows = [json.loads(line) for line in (Path(work) / "run" / "samples.jsonl").read_text().splitlines()]
    nll = {rule: {} for rule in rules}
    for row in rows:
        nll[row["rule"]][(row["variant"], row["episode"])] = row["metrics"]["nll"]
    print(f"\nsession-memory on {args.source} ({args.ctx_len}-token turns, {args.episodes} episodes per variant), "
          f"{args.rule}, rank {args.rank}, every layer; turn-2 NLL (nats), mean and paired 95% CI\n")
    print("| variant | none | native | vLLM engine | native - none | vLLM engine - none | vLLM engine - native |")
    print("|---|---|---|---|---|---|---|")
    for variant in ("seen", "unseen"):
        pick = {rule: {k: v for k, v in nll[rule].items() if k[0] == variant} for rule in rules}
        means = [sum(pick[r].values()) / len(pick[r]) for r in rules]
        deltas = [paired_delta(pick["none"], pick[rules[1]]), paired_delta(pick["none"], pick[rules[2]]),
                  paired_delta(pick[rules[1]], pick[rules[2]])]
        cells = [f"{d.mean:+.4f} [{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}]" if d.ci95 else f"{d.mean:+.4f}"
                 for d in deltas]
        print(f"| {variant} | {means[0]:.4f} | {means[1]:.4f} | {means[2]:.4f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
