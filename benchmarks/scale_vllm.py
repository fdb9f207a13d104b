"""vLLM's side of ``benchmarks/scale.py``: the static workload through ``LLM.generate``, in vLLM's own venv.

``run_vllm`` (called by scale.py) writes the prompts next to the saved model and runs this file with the given
python; the child (``python scale_vllm.py WORK --decode K --repeats R``) loads the model with vLLM
(float32, eager, no prefix caching, no tokenizer: token ids in, token ids out), and for each B times
``max_tokens=1`` (prefill tok/s = B * prompt / t1) and ``max_tokens=K+1`` (decode tok/s = B * K over the engine's
own time from the last first token to the last token; where it reports no timestamps, over tK - t1),
interleaved, minimum of R, after one untimed warm-up. It prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT_S = 3600


def run_vllm(python: str, work: Path, prompts: dict[int, list[list[int]]], args: argparse.Namespace) -> dict:
    """Rows ``{sessions, prefill_tok_s, decode_tok_s, ...}`` from vLLM, or ``{"error": why}``."""
    (work / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "VLLM_HOST_IP": "127.0.0.1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    cmd = [python, str(Path(__file__).resolve()), str(work), "--decode", str(args.decode),
           "--repeats", str(args.repeats)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def child(work: Path, decode: int, repeats: int) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = {int(b): p for b, p in json.loads((work / "prompts.json").read_text()).items()}
    length = len(next(iter(prompts.values()))[0])
    llm = LLM(model=str(work / "model"), dtype="float32", max_model_len=length + decode + 8,
              max_num_seqs=max(len(p) for p in prompts.values()), seed=0, enforce_eager=True,
              enable_prefix_caching=False, skip_tokenizer_init=True, disable_log_stats=False)

    def timed(batch: list, tokens: int) -> tuple[float, float | None]:
        """Wall seconds, and the engine's own decode seconds (last token - last first token) when it reports them."""
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        got = {len(o.outputs[0].token_ids) for o in outputs}
        if got != {tokens}:
            raise RuntimeError(f"vLLM generated {got} tokens per sequence, asked for {tokens}")
        stats = [o.metrics for o in outputs]
        if any(m is None or not getattr(m, "last_token_ts", 0.0) for m in stats):
            return seconds, None
        return seconds, max(m.last_token_ts for m in stats) - max(m.first_token_ts for m in stats)

    rows = []
    for b, ids in prompts.items():
        batch = [TokensPrompt(prompt_token_ids=p) for p in ids]
        timed(batch, 2)  # warm-up
        t1 = tk = engine = float("inf")
        for _ in range(repeats):
            t1 = min(t1, timed(batch, 1)[0])
            seconds, stamps = timed(batch, decode + 1)
            tk, engine = min(tk, seconds), min(engine, float("inf") if stamps is None else stamps)
        dt = engine if engine < float("inf") else tk - t1
        rows.append({"sessions": b, "prefill_tok_s": b * length / t1, "decode_tok_s": b * decode / max(dt, 1e-9),
                     "with_prefill_tok_s": b * (decode + 1) / tk, "prefill_s": t1, "decode_s": dt,
                     "decode_from": "engine timestamps" if engine < float("inf") else "t(K+1) - t(1)",
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    note = ("LLM.generate, float32, enforce_eager, greedy, ignore_eos; prefill = B * prompt / t(max_tokens=1); "
            f"decode: {rows[-1]['decode_from'] if rows else '-'} over K tokens; peak RSS: the vLLM process's "
            f"maxrss; KV cache space {os.environ.get('VLLM_CPU_KVCACHE_SPACE')} GiB")
    return {"version": vllm.__version__, "rows": rows, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", type=Path)
    parser.add_argument("--decode", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    result = child(args.work, args.decode, args.repeats)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
