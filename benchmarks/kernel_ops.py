"""Benchmark the fast-weight ops (apply, write, apply_write) against plain torch baselines.

In one run it measures the device's copy bandwidth and bf16 matmul rate (the roofline), then times each op at
the down_proj shapes of Llama-3.2-1B (d=2048, f=8192) and Llama-3-8B (d=4096, f=14336): apply at batch 1/8/32/64
(decode, one slot per row), write and apply_write at chunk 16/64/128/512/2048 (one slot). Each op runs as
``impl="triton"``, ``impl="torch"``, a bare torch baseline (bmm, or baddbmm_) and ``torch.compile`` of that
baseline. The table gives time, GB/s, TFLOP/s, achieved/roofline, and torch-baseline time / this time.

Without CUDA only the torch implementations run, at shapes divided by ``--cpu-scale`` (Triton's CPU interpreter
says nothing about speed); the output says so.

    python benchmarks/kernel_ops.py --out bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import NamedTuple

import torch
from adapt_runtime.kernels import apply, apply_write, write

MODELS = {"llama-3.2-1b": (2048, 8192), "llama-3-8b": (4096, 14336)}
BATCHES = (1, 8, 32, 64)
CHUNKS = (16, 64, 128, 512, 2048)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    op: str
    model: str
    d: int
    f: int
    size: int  # batch for apply, chunk for write / apply_write
    impl: str
    us: float
    gbps: float
    tflops: float
    of_roofline: float
    vs_torch: float | None = None
    note: str = ""


def timed(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Seconds per call: the median on CUDA, the minimum on CPU (where other processes add large outliers)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) if device.type == "cuda" else min(times)


def probes(device: torch.device, copy_mib: int, mm_n: int, reps: int) -> dict:
    """Copy bandwidth (read + write bytes) and bf16 / fp32 matmul rates of this device."""
    src = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device, 3, reps)
    out = {"copy_GBps": 2 * src.numel() * 4 / t_copy / 1e9, "copy_MiB": copy_mib, "matmul_n": mm_n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(mm_n, mm_n, device=device).to(dtype)
        t_mm = timed(lambda a=a: a @ a, device, 2, reps)
        out[f"matmul_{name}_TFLOPs"] = 2 * mm_n**3 / t_mm / 1e12
    return out


def compiled(fn: Callable, enabled: bool) -> tuple[Callable | None, str]:
    if not enabled:
        return None, "compile disabled"
    torch._dynamo.reset()  # each shape compiles afresh instead of exhausting one function's recompile limit
    try:
        return torch.compile(fn, dynamic=False), ""
    except Exception as err:  # noqa: BLE001 - report why the baseline is missing, keep benchmarking
        return None, f"torch.compile unavailable: {type(err).__name__}"


def bmm_apply(y, x, S, slots):
    """Baseline decode apply: gather each row's slot, one bmm, add."""
    y.add_(torch.bmm(x.unsqueeze(1).to(S.dtype), S[slots].transpose(1, 2)).squeeze(1).to(y.dtype))


def baddbmm_write(S, slot, V, X, decay):
    """Baseline write (no clip, no norm): ``S[slot] = decay * S[slot] + V^T X`` with one baddbmm_."""
    S[slot : slot + 1].baddbmm_(V.T.unsqueeze(0).to(S.dtype), X.unsqueeze(0).to(S.dtype), beta=decay)


def bmm_apply_write(y, x, S, slot, V, decay):
    """Baseline fused step: ``y += x S^T`` then the baddbmm_ write (S read twice)."""
    y.add_((x.to(S.dtype) @ S[slot].T).to(y.dtype))
    baddbmm_write(S, slot, V, x, decay)


class ToCompile(NamedTuple):
    """A torch.compile baseline: the function to compile and the arguments to call it with."""

    body: Callable
    args: tuple


def cases(args, device: torch.device, scale: int):
    """Yield (op, model, d, f, size, bytes, flops, {impl: callable or ToCompile}) for every benchmarked shape."""
    sd, ad = DTYPES[args.state_dtype], DTYPES[args.act_dtype]
    sb, ab = sd.itemsize, ad.itemsize
    for model, (d, f) in MODELS.items():
        d, f = d // scale, f // scale
        for b in args.batches:
            S = torch.randn(b, d, f, device=device).mul_(1e-3).to(sd)
            x, y = torch.randn(b, f, device=device).to(ad), torch.zeros(b, d, device=device).to(ad)
            slots = torch.arange(b, device=device)
            fns = {
                "triton": partial(apply, y, x, S, slots, impl="triton"),
                "torch": partial(apply, y, x, S, slots, impl="torch"),
                "bmm": partial(bmm_apply, y, x, S, slots),
                "compile(bmm)": ToCompile(bmm_apply, (y, x, S, slots)),
            }
            yield "apply", model, d, f, b, b * d * f * sb + b * (2 * d + f) * ab, 2 * b * d * f, fns
        S = torch.randn(2, d, f, device=device).mul_(1e-3).to(sd)
        slot, bound = torch.tensor([1], device=device), torch.tensor([1e3], device=device)
        for c in args.chunks:
            V, X = torch.randn(c, d, device=device).mul_(1e-2).to(ad), torch.randn(c, f, device=device).to(ad)
            y = torch.zeros(c, d, device=device).to(ad)
            fns = {
                "triton": partial(write, S, slot, V[None], X[None], None, 0.99, bound, impl="triton"),
                "torch": partial(write, S, slot, V[None], X[None], None, 0.99, bound, impl="torch"),
                "baddbmm_": partial(baddbmm_write, S, 1, V, X, 0.99),
                "compile(baddbmm_)": ToCompile(baddbmm_write, (S, 1, V, X, 0.99)),
            }
            yield "write", model, d, f, c, 2 * d * f * sb + c * (d + f) * ab, 2 * c * d * f, fns
            fns = {
                "triton": partial(apply_write, y, X, S, 1, V, None, 0.99, 1e3, impl="triton"),
                "torch": partial(apply_write, y, X, S, 1, V, None, 0.99, 1e3, impl="torch"),
                "bmm+baddbmm_": partial(bmm_apply_write, y, X, S, 1, V, 0.99),
                "compile(bmm+baddbmm_)": ToCompile(bmm_apply_write, (y, X, S, 1, V, 0.99)),
            }
            yield "apply_write", model, d, f, c, 2 * d * f * sb + c * (3 * d + f) * ab, 4 * c * d * f, fns


def run(args) -> dict:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    scale = 1 if cuda else args.cpu_scale
    roof = probes(device, args.copy_mib if cuda else min(args.copy_mib, 256), 8192 if cuda else 2048, args.reps)
    peak = roof["matmul_bf16_TFLOPs"] if args.state_dtype != "float32" or cuda else roof["matmul_fp32_TFLOPs"]
    rows: list[Row] = []
    for op, model, d, f, size, nbytes, flops, fns in cases(args, device, scale):
        t_roof = max(nbytes / (roof["copy_GBps"] * 1e9), flops / (peak * 1e12))
        base_time = None
        for impl, fn in fns.items():
            note = ""
            if impl == "triton" and not cuda:
                continue
            if isinstance(fn, ToCompile):
                fn_c, note = compiled(fn.body, not args.no_compile)
                if fn_c is None:
                    rows.append(Row(op, model, d, f, size, impl, float("nan"), 0, 0, 0, None, note))
                    continue
                fn = partial(fn_c, *fn.args)
            try:
                t = timed(fn, device, args.warmup, args.reps)
            except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for torch.compile on CPU
                rows.append(Row(op, model, d, f, size, impl, float("nan"), 0, 0, 0, None, type(err).__name__))
                continue
            if impl in ("bmm", "baddbmm_", "bmm+baddbmm_"):
                base_time = t
            rows.append(Row(op, model, d, f, size, impl, t * 1e6, nbytes / t / 1e9, flops / t / 1e12, t_roof / t))
        for row in rows:
            same = (row.op, row.model, row.size) == (op, model, size)
            if same and base_time and not math.isnan(row.us):
                row.vs_torch = base_time / (row.us / 1e6)
        if cuda:
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU, {os.cpu_count()} cores",
        "note": "" if cuda else f"NO CUDA: torch implementations only, shapes divided by {scale}; "
        "Triton is not timed (its CPU interpreter says nothing about speed).",
        "torch": torch.__version__,
        "timing": "median" if cuda else "minimum",
        "threads": torch.get_num_threads(),
        "state_dtype": args.state_dtype,
        "act_dtype": args.act_dtype,
        "roofline": roof,
        "peak_TFLOPs_used": peak,
        "rows": [asdict(r) for r in rows],
    }


def table(result: dict) -> str:
    lines = [f"device: {result['device']}  torch {result['torch']}  threads {result['threads']}  "
             f"state {result['state_dtype']}  activations {result['act_dtype']}  timing: {result['timing']}"]
    if result["note"]:
        lines.append(result["note"])
    r = result["roofline"]
    lines.append(f"roofline: copy {r['copy_GBps']:.1f} GB/s, matmul bf16 {r['matmul_bf16_TFLOPs']:.3f} TFLOP/s, "
                 f"fp32 {r['matmul_fp32_TFLOPs']:.3f} TFLOP/s (peak used: {result['peak_TFLOPs_used']:.3f})")
    head = f"{'op':<12}{'model':<14}{'d x f':<12}{'B/C':>5}  {'impl':<22}{'us':>11}{'GB/s':>9}{'TFLOP/s':>9}"
    lines.append(head + f"{'roofline':>9}{'vs torch':>9}  note")
    for row in result["rows"]:
        vs = f"{row['vs_torch']:.2f}x" if row["vs_torch"] else "-"
        lines.append(
            f"{row['op']:<12}{row['model']:<14}{row['d']}x{row['f']:<7}{row['size']:>5}  {row['impl']:<22}"
            f"{row['us']:>11.1f}{row['gbps']:>9.1f}{row['tflops']:>9.3f}{row['of_roofline']:>9.2f}{vs:>9}  "
            f"{row['note']}"
        )
    lines.append("roofline = max(bytes / copy rate, FLOPs / matmul rate) / time; vs torch = bare torch baseline "
                 "(bmm or baddbmm_) time / this time.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of S")
    parser.add_argument("--act-dtype", choices=list(DTYPES), default="bfloat16", help="dtype of x, y, V")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="apply batch sizes")
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS), help="write chunk lengths")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--reps", type=int, default=10, help="timed calls (median on CUDA, minimum on CPU)")
    parser.add_argument("--copy-mib", type=int, default=2048, help="buffer size of the copy probe (CPU: <= 256)")
    parser.add_argument("--cpu", action="store_true", help="run the CPU path even when CUDA is present")
    parser.add_argument("--cpu-scale", type=int, default=8, help="without CUDA, divide d and f by this")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(table(result))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
