"""Serving benchmark: TTFT, inter-token latency and tokens/s of adapt-serve under 1, 8 and 32 concurrent
streaming sessions, for a plastic rule and for ``--rule none``, then a bounded soak (many clients, many turns)
that must end with zero errors and flat server memory.

    python benchmarks/serving.py                      # hebbian vs none, 1/8/32 sessions, 60 s soak, best of 3
    python benchmarks/serving.py --soak-seconds 10 --max-tokens 32 --out runs/serving.json
    python benchmarks/serving.py --shape 1024 --sessions 1,8 --threads 2   # random-init hidden-1024 model

Each measurement starts real ``adapt-serve`` processes on free loopback ports; every client owns a session and
streams completions through it (so the plastic rows write their own fast weights while decoding). The target on
CPU is an aggregate tokens/s at 8 sessions of at least 3x the single-session figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from adapt_runtime.serving.launch import ServerProcess
from tqdm import tqdm

KEY = "bench-key"
PROMPTS = ["Once upon a time, there was a little", "Tom and his sister went to the park to",
           "The cat saw a big red ball and", "One day, a bird flew over the tall"]


@dataclass
class RequestStats:
    ttft: float
    gaps: list[float]
    tokens: int


@dataclass
class Row:
    rule: str
    sessions: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    itl_p50_ms: float
    itl_p90_ms: float
    errors: int
    engine_tokens_per_s: float = float("nan")


@dataclass
class Soak:
    rule: str
    clients: int
    seconds: float
    requests: int
    tokens: int
    errors: int
    rss_start_mb: float
    rss_end_mb: float
    rss_max_mb: float
    rss_samples_mb: list[float] = field(default_factory=list)


def start_server(rule: str, model: str, threads: int, log_path: Path) -> ServerProcess:
    return ServerProcess(["--model", model, "--rule", rule, "--api-key", KEY, "--log-level", "warning",
                          "--max-concurrent-requests", "256", "--threads", str(threads)], log_path=log_path)


async def stream_once(http: httpx.AsyncClient, sid: str, prompt: str | list[int], max_tokens: int) -> RequestStats:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", "/v1/completions", json=body, headers={"X-Session-ID": sid}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return RequestStats(stamps[0] - start if stamps else float("nan"), gaps, len(stamps))


async def new_session(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/sessions")
    response.raise_for_status()
    return response.json()["id"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def measure(server: ServerProcess, rule: str, sessions: int, turns: int, max_tokens: int,
                  prompts: list[str] | list[list[int]] | None = None) -> Row:
    """``sessions`` clients, each streaming ``turns`` completions through its own session (``prompts`` in turn,
    text or token ids; default ``PROMPTS``), after one warm-up turn each."""
    prompts = prompts or PROMPTS
    limits = httpx.Limits(max_connections=sessions + 4)
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=600, limits=limits) as http:
        sids = [await new_session(http) for _ in range(sessions)]
        await asyncio.gather(*(stream_once(http, s, prompts[0], 4) for s in sids))  # warm-up turn

        async def client(i: int) -> list[RequestStats | Exception]:
            out: list[RequestStats | Exception] = []
            for t in range(turns):
                try:
                    out.append(await stream_once(http, sids[i], prompts[(i + t) % len(prompts)], max_tokens))
                except (RuntimeError, httpx.HTTPError) as exc:
                    out.append(exc)
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(sessions))) for r in rs]
        seconds = time.perf_counter() - start
        for sid in sids:
            await http.delete(f"/v1/sessions/{sid}")
    ok = [r for r in results if isinstance(r, RequestStats)]
    tokens = sum(r.tokens for r in ok)
    gaps = [g for r in ok for g in r.gaps]
    ttfts = [r.ttft for r in ok]
    return Row(rule, sessions, len(results), tokens, round(seconds, 2), round(tokens / seconds, 1),
               round(_pct(ttfts, 0.5), 1), round(_pct(ttfts, 0.9), 1), round(_pct(gaps, 0.5), 1),
               round(_pct(gaps, 0.9), 1), len(results) - len(ok))


async def soak(server: ServerProcess, rule: str, clients: int, seconds: float, max_tokens: int) -> Soak:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=600, limits=limits) as http:
        sids = [await new_session(http) for _ in range(clients)]
        counts = {"requests": 0, "tokens": 0, "errors": 0}
        deadline = time.monotonic() + seconds

        async def client(i: int) -> None:
            turn = 0
            while time.monotonic() < deadline:
                try:
                    stats = await stream_once(http, sids[i], PROMPTS[(i + turn) % len(PROMPTS)], max_tokens)
                    counts["tokens"] += stats.tokens
                except (RuntimeError, httpx.HTTPError):
                    counts["errors"] += 1
                counts["requests"] += 1
                turn += 1

        samples: list[float] = []

        async def sample() -> None:
            bar = tqdm(total=int(seconds), desc=f"soak {rule}", unit="s", leave=False)
            while time.monotonic() < deadline:
                samples.append(round(server.rss_mb(), 1))
                await asyncio.sleep(1)
                bar.update(1)
            bar.close()

        await asyncio.gather(sample(), *(client(i) for i in range(clients)))
        samples.append(round(server.rss_mb(), 1))
    warm = samples[min(len(samples) - 1, max(1, len(samples) // 6))]
    return Soak(rule, clients, seconds, counts["requests"], counts["tokens"], counts["errors"], warm,
                samples[-1], max(samples), samples)


def engine_tokens_per_s(model: str, rule: str, sessions: int, turns: int, max_tokens: int) -> float:
    """The same workload on the scheduler alone (no HTTP, no client): the ceiling the server works against."""
    import threading

    from adapt_runtime.serving.engine.events import Done
    from adapt_runtime.serving.engine.native import Engine
    from adapt_runtime.serving.engine.sampling import SamplingParams
    from adapt_runtime.serving.engine.scheduler import Job, _deliver

    import adapt_runtime as ar

    loaded = ENGINES.get(model)
    if loaded is None:
        loaded = ENGINES[model] = ar.load_model(model)
    runtime = ar.patch(loaded[0], rule=rule)
    engine = Engine(runtime, loaded[1])
    engine.scheduler.post = _deliver
    try:
        states = [runtime.new_state() for _ in range(sessions)]
        start = time.perf_counter()
        for turn in range(turns):
            finished = threading.Semaphore(0)

            def emit(event: object, done: threading.Semaphore = finished) -> None:
                if isinstance(event, Done):
                    done.release()

            for i, state in enumerate(states):
                ids = engine.encode(PROMPTS[(i + turn) % len(PROMPTS)])
                prompt = engine.plan(state, ids, False, max_tokens)
                params = SamplingParams(max_tokens=max_tokens, temperature=0.8)
                engine.scheduler.submit(Job([prompt], 1, params, True, frozenset(), emit))
            for _ in states:
                finished.acquire()
        seconds = time.perf_counter() - start
    finally:
        engine.close()
        runtime.unpatch()
    return sessions * turns * max_tokens / seconds


ENGINES: dict[str, tuple] = {}


def _table(rows: list[Row]) -> str:
    head = ("| rule | sessions | tokens/s | x single | TTFT p50 / p90 ms | ITL p50 / p90 ms | requests | errors "
            "| engine alone tokens/s (x single) |\n|---|---|---|---|---|---|---|---|---|")
    single = {r.rule: r.tokens_per_s for r in rows if r.sessions == 1}
    engine_single = {r.rule: r.engine_tokens_per_s for r in rows if r.sessions == 1}
    lines = [head]
    for r in rows:
        ratio = r.tokens_per_s / single[r.rule] if single.get(r.rule) else float("nan")
        engine_ratio = r.engine_tokens_per_s / engine_single[r.rule] if engine_single.get(r.rule) else float("nan")
        lines.append(f"| {r.rule} | {r.sessions} | {r.tokens_per_s:.1f} | {ratio:.2f} | "
                     f"{r.ttft_p50_ms:.0f} / {r.ttft_p90_ms:.0f} | {r.itl_p50_ms:.1f} / {r.itl_p90_ms:.1f} | "
                     f"{r.requests} | {r.errors} | {r.engine_tokens_per_s:.1f} ({engine_ratio:.2f}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", help="model to serve (default: the bundled stories260K)")
    parser.add_argument("--rules", default="hebbian,none", help="comma list of rules to compare")
    parser.add_argument("--sessions", default="1,8,32", help="comma list of concurrent session counts")
    parser.add_argument("--turns", type=int, default=4, help="streamed turns per session per measurement")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement; the best is kept (a shared machine only ever slows a run down)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per turn")
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="soak duration (0 skips the soak)")
    parser.add_argument("--soak-clients", type=int, default=32, help="concurrent clients in the soak")
    parser.add_argument("--soak-rule", default=None, help="rule for the soak (default: the first of --rules)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the server (1: fastest for the bundled model, see the README)")
    parser.add_argument("--no-engine", action="store_true",
                        help="skip the engine-alone column (the scheduler driven in-process, without HTTP)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--shape", choices=["1024"], default=None,
                        help="serve scale.py's random-init shape instead of --model (1024: hidden 1024, 8 layers)")
    args = parser.parse_args()
    if args.shape:  # saved once to a temp folder; the servers and the engine-alone column load it from there
        from scale import save_servable

        work = tempfile.TemporaryDirectory(prefix=f"serving-{args.shape}-")  # removed when main returns
        args.model = str(save_servable(args.shape, Path(work.name)))
    rules = [r for r in args.rules.split(",") if r]
    counts = [int(c) for c in args.sessions.split(",") if c]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "adapt-serve-bench.log"
    rows: list[Row] = []
    soak_result = None
    with tqdm(total=len(rules) * len(counts), desc="measurements") as bar:
        for rule in rules:
            server = start_server(rule, args.model, args.threads, log_path)
            try:
                for n in counts:
                    runs = [asyncio.run(measure(server, rule, n, args.turns, args.max_tokens))
                            for _ in range(args.repeat)]
                    rows.append(max(runs, key=lambda r: r.tokens_per_s))
                    bar.update(1)
                if args.soak_seconds > 0 and rule == (args.soak_rule or rules[0]):
                    soak_result = asyncio.run(soak(server, rule, args.soak_clients, args.soak_seconds,
                                                   args.max_tokens))
            finally:
                server.stop()
    if not args.no_engine:
        import torch

        torch.set_num_threads(args.threads)
        for row in tqdm(rows, desc="engine alone"):
            row.engine_tokens_per_s = round(max(
                engine_tokens_per_s(args.model, row.rule, row.sessions, args.turns, args.max_tokens)
                for _ in range(args.repeat)), 1)
    print(f"\nadapt-serve, model {args.model}, {args.max_tokens} tokens per turn, {args.turns} turns per "
          f"session, best of {args.repeat} runs, {args.threads} torch thread(s), {os.cpu_count()} CPUs\n")
    print(_table(rows))
    verdict = 0
    for rule in rules:
        by = {r.sessions: r.tokens_per_s for r in rows if r.rule == rule}
        if 1 in by and 8 in by:
            ratio = by[8] / by[1]
            print(f"\n{rule}: 8 sessions give {ratio:.2f}x the single-session tokens/s (target >= 3x)")
    if soak_result is not None:
        s = soak_result
        half = s.rss_samples_mb[len(s.rss_samples_mb) // 2 :]
        print(f"\nsoak ({s.rule}): {s.clients} clients, {s.seconds:.0f} s, {s.requests} requests, {s.tokens} "
              f"tokens, {s.errors} errors; server RSS {s.rss_start_mb:.0f} MB after warm-up, "
              f"{min(half):.0f}-{max(half):.0f} MB over the second half, {s.rss_end_mb:.0f} MB at the end")
        verdict = int(s.errors > 0)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"rows": [asdict(r) for r in rows], "soak": asdict(soak_result) if soak_result else None}
        args.out.write_text(json.dumps(payload, indent=2))
    return verdict


if __name__ == "__main__":
    sys.exit(main())
