"""Prefill interleave benchmark: how fast one stream decodes while 8 other clients send long prompts.

    python benchmarks/prefill_interleave.py                          # bundled model, --prefill-chunk 0 vs others
    python benchmarks/prefill_interleave.py --shape 1024 --prompt-tokens 256 --chunks 0,256 --repeat 1

The scheduler runs in-process (the server's model thread, without HTTP). One job streams greedy tokens; once it
decodes, 8 jobs each bring a prompt of ``--prompt-tokens`` random tokens (a fresh session each, one answer
token). The window runs from their arrival until the last of them is read. Printed per ``--prefill-chunk``
(side by side in one run, measurements interleaved, the median of ``--repeat``): the stream's tokens/s alone and
during the window, and how long the 8 prompts took to be read (first and last). ``--prefill-chunk 0`` reads each
prompt whole, as the server did before pieces: the stream stalls for the whole window.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from adapt_runtime.serving.engine.detokenize import Detokenizer
from adapt_runtime.serving.engine.events import Done, Event, Failed, PromptScored, Token
from adapt_runtime.serving.engine.sampling import SamplingParams
from adapt_runtime.serving.engine.scheduler import Job, Prompt, Scheduler

import adapt_runtime as ar

WARM_TOKENS = 16


@dataclass
class Result:
    chunk: int
    alone_tok_s: float
    window_tok_s: float
    window_tokens: int
    first_read_s: float
    last_read_s: float


class Clock:
    """Event times per job, and a wait for a condition on them."""

    def __init__(self) -> None:
        self.times: dict[int, list[tuple[float, Event]]] = {}
        self._cond = threading.Condition()

    def post(self, batch: list[tuple[Job, Event]]) -> None:
        now = time.perf_counter()
        with self._cond:
            for job, event in batch:
                self.times.setdefault(id(job), []).append((now, event))
            self._cond.notify_all()

    def of(self, job: Job, kind: type) -> list[float]:
        return [t for t, e in self.times.get(id(job), []) if isinstance(e, kind)]

    def wait(self, ready: object, timeout: float = 600.0) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, timeout):  # type: ignore[arg-type]
                raise RuntimeError("the benchmark's jobs did not finish in time")


def measure(rt: object, tokenizer: object, chunk: int, clients: int, prompt_tokens: int, seed: int) -> Result:
    clock = Clock()
    scheduler = Scheduler(rt, Detokenizer(tokenizer), rt.max_length, post=clock.post, prefill_chunk=chunk)
    start_ids = tokenizer.encode("Once upon a time")
    stream = Job([Prompt(rt.new_state(), start_ids, start_ids)], 1,
                 SamplingParams(max_tokens=rt.max_length - len(start_ids) - 1, temperature=0.0), True,
                 frozenset(), emit=lambda _: None)
    generator = torch.Generator().manual_seed(seed)
    vocab = min(rt.vocab_size, len(tokenizer))
    longs = []
    for _ in range(clients):
        ids = torch.randint(3, vocab, (prompt_tokens,), generator=generator).tolist()
        longs.append(Job([Prompt(rt.new_state(), ids, ids)], 1, SamplingParams(max_tokens=1, temperature=0.0),
                         True, frozenset(), emit=lambda _: None))
    try:
        scheduler.submit(stream)
        clock.wait(lambda: len(clock.of(stream, Token)) >= WARM_TOKENS)
        arrived = time.perf_counter()
        for job in longs:
            scheduler.submit(job)
        clock.wait(lambda: all(clock.of(j, Done) or clock.of(j, Failed) for j in longs))
        stream.cancelled.set()
    finally:
        scheduler.close()
    if any(clock.of(j, Failed) for j in longs):
        raise RuntimeError("a long prompt failed to be read")
    reads = sorted(clock.of(j, PromptScored)[0] for j in longs)
    tokens = clock.of(stream, Token)
    before = [t for t in tokens if t < arrived]
    alone = (len(before) - 1) / (before[-1] - before[0]) if len(before) > 1 else float("nan")
    inside = [t for t in tokens if arrived <= t <= reads[-1]]
    window = reads[-1] - arrived
    return Result(chunk, alone, len(inside) / window, len(inside), reads[0] - arrived, window)


def load(args: argparse.Namespace) -> tuple[object, object, str]:
    if args.shape is None:
        model, tokenizer = ar.load_model(args.model)
        return ar.patch(model, rule=args.rule), tokenizer, args.model
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import SHAPES, build
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ar.bundled_model_dir()))
    shape = replace(SHAPES[args.shape], vocab=len(tokenizer))  # the bundled tokenizer's 512 ids stream as text
    model = build(shape)
    name = (f"random-init Llama hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, "
            f"vocab {shape.vocab}")
    return ar.patch(model, rule=args.rule), tokenizer, name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", help="model (default: the bundled stories260K)")
    parser.add_argument("--shape", default=None, help="instead: a random-init shape of benchmarks/scale.py (1024)")
    parser.add_argument("--rule", default="hebbian", help="the sessions' rule")
    parser.add_argument("--chunks", default="0,32,64,128,256", help="comma list of --prefill-chunk values")
    parser.add_argument("--clients", type=int, default=8, help="clients sending a long prompt at once")
    parser.add_argument("--prompt-tokens", type=int, default=384, help="tokens of each long prompt")
    parser.add_argument("--repeat", type=int, default=3, help="runs per chunk (interleaved); the median is shown")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's --threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rt, tokenizer, name = load(args)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    measure(rt, tokenizer, chunks[-1], 2, min(64, args.prompt_tokens), seed=99)  # warm-up
    runs: dict[int, list[Result]] = {c: [] for c in chunks}
    for r in range(args.repeat):
        for chunk in chunks:
            runs[chunk].append(measure(rt, tokenizer, chunk, args.clients, args.prompt_tokens, seed=r))
    print(f"\n{name}, rule {args.rule}, {args.threads} torch thread(s), {os.cpu_count()} CPUs: one stream decoding "
          f"while {args.clients} clients each send a {args.prompt_tokens}-token prompt; median of {args.repeat}\n")
    print("| --prefill-chunk | stream tok/s alone | stream tok/s while the prompts are read | x alone "
          "| stream tokens in the window | first prompt read after s | all read after s |")
    print("|---|---|---|---|---|---|---|")
    for chunk in chunks:
        rs = runs[chunk]
        alone = statistics.median(r.alone_tok_s for r in rs)
        during = statistics.median(r.window_tok_s for r in rs)
        print(f"| {chunk or '0 (whole prompts)'} | {alone:.1f} | {during:.1f} | {during / alone:.2f} | "
              f"{statistics.median(r.window_tokens for r in rs):.0f} | "
              f"{statistics.median(r.first_read_s for r in rs):.3f} | "
              f"{statistics.median(r.last_read_s for r in rs):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
