"""Memory probes for ``benchmarks/scale.py``: copy and read bandwidth, the bound it implies for dense fp32 S, and
the resident high-water mark of one measurement."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

MIB = 2**20


def reset_peak() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM since the last reset; else getrusage's maxrss (the process peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bandwidth(mib: int, repeats: int = 5) -> dict[str, float]:
    """GB/s of an fp32 tensor, best of N: ``copy_`` into a held tensor and ``clone`` (a new one: page faults
    included, like stacking rows into a fresh tensor) in bytes copied per second, ``sum`` in bytes read per second."""
    x, y = torch.ones(mib * MIB // 4), torch.zeros(mib * MIB // 4)
    best = {"copy": float("inf"), "clone": float("inf"), "sum": float("inf")}
    for _ in range(repeats):
        for name, op in (("copy", lambda t: y.copy_(t)), ("clone", torch.clone), ("sum", torch.sum)):
            start = time.perf_counter()
            op(x)
            best[name] = min(best[name], time.perf_counter() - start)
    return {f"{name}_gb_s": mib * MIB / t / 1e9 for name, t in best.items()} | {"tensor_mib": mib}


def bound_lines(rows: list[dict], bw: dict[str, float], hidden: int, intermediate: int,
                plastic: int) -> tuple[list[str], dict]:
    """Per B: static decode step t vs t + B * plastic * d * f * 4 bytes / read bandwidth (dense fp32 S)."""
    lines, bounds = [], {}
    per_session = plastic * hidden * intermediate * 4
    for r in rows:
        if r["rule"] != "none" or r.get("engine") != "runtime":
            continue
        b = r["sessions"]
        step = b / r["decode_tok_s"]
        read = b * per_session / (bw["sum_gb_s"] * 1e9)
        bounds[b] = step / (step + read)
        lines.append(f"B={b}: static decode step {step * 1e3:.1f} ms; reading {b} sessions' dense fp32 S "
                     f"({b * per_session / MIB:.1f} MiB) at {bw['sum_gb_s']:.1f} GB/s takes {read * 1e3:.1f} ms: "
                     f"dense S bound {bounds[b]:.2f}x static")
    return lines, bounds
