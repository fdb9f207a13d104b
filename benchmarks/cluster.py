"""Cluster benchmark: adapt-serve on Ray Serve against the single-process server, printed as one table.

    python benchmarks/cluster.py                 # needs the ray extra (pip install -e '.[ray]') and redis-server
    python benchmarks/cluster.py --sessions 16 --turns 4 --state-mb 1,16,64 --out runs/cluster.json

Latencies are the best of ``--repeat`` runs (a shared 2-core machine moves them by tens of percent).

Measures, in one run on this machine: the commit path alone (blob write + fenced head CAS, p50/p99, bytes written
per turn) for synthetic state sizes; streamed TTFT and inter-token latency of the single-process server and of the
cluster (2 engine replicas + ingress, ``ray.init(num_cpus=2)``) on the bundled model, one session turn at a time;
the affinity hit rate (a session's turn on the replica of its previous turn); sessions remapped when the ring goes
2 -> 3 -> 2 replicas; and failover time from killing a session's replica to its first good turn.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from adapt_runtime.serving.launch import ServerProcess, free_port, healthy


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(url, timeout=2):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer /health in {timeout} s")
        time.sleep(0.3)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def commit_latency(config: Any, sizes_mb: list[int], commits: int) -> list[dict[str, Any]]:
    """The commit path alone: acquire, write blob, fenced CAS, release; random bytes of each size."""
    from adapt_runtime.serving.cluster.config import open_states

    states = open_states(config, "bench")
    rows = []
    for mb in sizes_mb:
        data = os.urandom(mb * 2**20)
        key = f"bench/commit-{mb}mb-{secrets.token_hex(3)}"
        times, base = [], 0
        for _ in range(commits):
            start = time.perf_counter()
            lease = states.leases.acquire(key, renew=False)
            base = states.commit(lease, base, data).version
            states.leases.release(lease)
            times.append(time.perf_counter() - start)
        head_bytes = len(json.dumps({"version": base, "epoch": base, "blob": "v" * 40}))
        rows.append({"state_mb": mb, "p50_ms": 1000 * pct(times, 0.5), "p99_ms": 1000 * pct(times, 0.99),
                     "bytes_per_turn": len(data) + head_bytes})
    return rows


def stream_turn(client: httpx.Client, sid: str, prompt: str, max_tokens: int) -> tuple[float, list[float], str]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    stamps: list[float] = []
    with client.stream("POST", "/v1/completions", json=body, headers={"X-Session-ID": sid}) as response:
        response.raise_for_status()
        replica = response.headers.get("x-replica-id", "")
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text"' in line:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - start, gaps, replica


def latency(url: str, sessions: int, turns: int, max_tokens: int) -> dict[str, Any]:
    ttft, itl, placements = [], [], {}
    with httpx.Client(base_url=url, timeout=120) as client:
        stream_turn(client, "warm-up", "Warm up", max_tokens)
        for turn in range(turns):
            for s in range(sessions):
                sid = f"lat-{s}"
                first, gaps, replica = stream_turn(client, sid, f"Turn {turn}: once upon a time", max_tokens)
                ttft.append(first)
                itl.extend(gaps)
                placements.setdefault(sid, []).append(replica)
    stays = sum(a == b for p in placements.values() for a, b in zip(p, p[1:]))
    moves = sum(len(p) - 1 for p in placements.values())
    return {"ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p99_ms": 1000 * pct(ttft, 0.99),
            "itl_p50_ms": 1000 * pct(itl, 0.5), "itl_p99_ms": 1000 * pct(itl, 0.99),
            "affinity": stays / moves if moves else float("nan"), "placements": placements}


def best_latency(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """``latency`` ``--repeat`` times; each percentile is the best (lowest) of the runs, affinity the worst."""
    runs = [latency(url, args.sessions, args.turns, args.max_tokens) for _ in range(args.repeat)]
    best = {k: min(r[k] for r in runs) for k in runs[0] if k.endswith("_ms")}
    return {**best, "affinity": min(r["affinity"] for r in runs), "placements": runs[0]["placements"]}


def owners(url: str, sids: list[str]) -> dict[str, str]:
    with httpx.Client(base_url=url, timeout=60) as client:
        return {sid: client.get(f"/v1/sessions/{sid}").headers["x-replica-id"] for sid in sids}


def replica_actors() -> dict[str, Any]:
    import ray

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_REPLICA") and "SessionEngine" in entry["name"]:
            found[entry["name"].rsplit("#", 1)[-1]] = ray.get_actor(entry["name"], namespace=entry["namespace"])
    return found


def wait_replicas(n: int, timeout: float = 120) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get("adapt")
        if len(replica_actors()) == n and status is not None and str(status.status).endswith("RUNNING"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{n} replicas not running after {timeout} s")


def cluster_run(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    import ray
    from adapt_runtime.serving.cluster.cli_ray import build_application
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(config), name="adapt", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        result = best_latency(url, args)
        sids = list(result.pop("placements"))
        before = owners(url, sids)
        serve.run(build_application(dataclasses.replace(config, replicas=3)), name="adapt", route_prefix="/")
        wait_replicas(3)
        grown = owners(url, sids)
        serve.run(build_application(config), name="adapt", route_prefix="/")
        wait_replicas(2)
        shrunk = owners(url, sids)
        result["remapped_2_to_3"] = sum(before[s] != grown[s] for s in sids)
        result["remapped_3_to_2"] = sum(grown[s] != shrunk[s] for s in sids)
        victim_sid = sids[0]
        victim = shrunk[victim_sid]
        killed = time.perf_counter()
        ray.kill(replica_actors()[victim], no_restart=True)
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                try:
                    stream_turn(client, victim_sid, "After the kill", 4)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
        result["failover_s"] = time.perf_counter() - killed
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


def single_run(args: argparse.Namespace) -> dict[str, Any]:
    server = ServerProcess(["--threads", "1", "--log-level", "warning"])
    try:
        result = best_latency(server.url, args)
        result.pop("placements")
        return result
    finally:
        server.stop()


def table(commits: list[dict[str, Any]], single: dict[str, Any], cluster: dict[str, Any], args: Any) -> str:
    rows = [("measure", "value")]
    for c in commits:
        rows.append((f"commit {c['state_mb']} MB state: p50 / p99", f"{c['p50_ms']:.1f} / {c['p99_ms']:.1f} ms"))
        rows.append((f"commit {c['state_mb']} MB state: bytes written per turn", f"{c['bytes_per_turn']:,}"))
    rows.append(("bundled model: bytes written per turn (blob)", f"{cluster['blob_bytes']:,}"))
    rows.append((f"affinity hit rate ({args.sessions} sessions x {args.turns} turns)", f"{cluster['affinity']:.1%}"))
    rows.append((f"sessions remapped 2 -> 3 replicas (of {args.sessions})", str(cluster["remapped_2_to_3"])))
    rows.append((f"sessions remapped 3 -> 2 replicas (of {args.sessions})", str(cluster["remapped_3_to_2"])))
    rows.append(("failover: kill -> first good turn of its session", f"{cluster['failover_s']:.1f} s"))
    for name in ("ttft", "itl"):
        for q in ("p50", "p99"):
            k = f"{name}_{q}_ms"
            rows.append((f"{name.upper()} {q}: single process / cluster (overhead)",
                         f"{single[k]:.1f} / {cluster[k]:.1f} ms ({cluster[k] - single[k]:+.1f} ms)"))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {a:<{width}} | {b} |" for a, b in rows]
    lines.insert(1, f"|{'-' * (width + 2)}|---|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--state-mb", default="1,16,64", help="synthetic state sizes for the commit path (MB)")
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="latency runs; the best of them is reported")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()

    from adapt_runtime.serving.cluster.config import ClusterConfig
    from adapt_runtime.serving.config import ServerConfig

    folder = Path(tempfile.mkdtemp(prefix="adapt-cluster-bench-"))
    redis_proc, redis_url = start_redis(folder)
    try:
        config = ClusterConfig(ServerConfig(model="llama", threads=1), redis_url, str(folder / "store"),
                               replicas=2, replica_cpus=0.5, lease_ttl_ms=3000)
        commits = commit_latency(config, [int(x) for x in args.state_mb.split(",")], args.commits)
        single = single_run(args)
        cluster = cluster_run(config, args)
        blobs = [p.stat().st_size for p in (folder / "store").rglob("v*.safetensors") if "lat-" in str(p)]
        cluster["blob_bytes"] = int(statistics.median(blobs)) if blobs else 0
    finally:
        redis_proc.terminate()
        shutil.rmtree(folder, ignore_errors=True)
    print(table(commits, single, cluster, args))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"commits": commits, "single": single, "cluster": cluster}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
