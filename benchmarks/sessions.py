"""Many sessions decoded together: plastic vs static tok/s, side by side in one run (issue 9's table).

    python benchmarks/sessions.py                       # hidden 1024, intermediate 4096, 8 layers, vocab 32000
    python benchmarks/sessions.py --hidden 256 --intermediate 1024 --layers 4 --vocab 8000 --sessions 1,8

A random-init Llama; every session reads a 64-token prompt (one batched ``rt.forward`` over the list of states),
then B sessions decode K greedy tokens together, one ``rt.forward(ids [B, 1], states)`` per step. ``none`` is the
static baseline through the same runtime (no fast weights); ``x static`` is each rule's decode tok/s over it at the
same B. With ``--pool both`` (default) every plastic rule also runs with the runtime's slot pool disabled
(``rule/nopool``: each call stacks every row's S into a new ``[B, d, f]`` tensor), so before/after show in one
run. Each variant has its own copy of the model (same seed); repeats are interleaved and the minimum kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adapt_runtime as ar


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, vocab_size=args.vocab, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def run_sessions(rt, prompts: torch.Tensor, steps: int) -> tuple[float, float]:
    """Prefill and decode seconds for ``len(prompts)`` sessions decoded together."""
    states = [rt.new_state() for _ in range(prompts.shape[0])]
    with torch.inference_mode():
        start = time.perf_counter()
        logits = rt.forward(prompts, states if len(states) > 1 else states[0])
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            ids = logits[:, -1].argmax(-1, keepdim=True)
            logits = rt.forward(ids, states if len(states) > 1 else states[0])
        decode = time.perf_counter() - start
    return prefill, decode


def variants(args: argparse.Namespace) -> dict:
    out = {}
    for rule in ["none", *args.rules.split(",")]:
        pools = [True] if rule == "none" else {"both": [True, False], "on": [True], "off": [False]}[args.pool]
        for pool in pools:
            rt = ar.patch(build(args), rule=rule, chunk_size=args.chunk, layers=args.plastic_layers)
            if not pool:
                rt.slot_pool = None
            out[rule if pool else f"{rule}/nopool"] = rt
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--plastic-layers", default="all", help="plastic layers (default all: 8 x d x f per session)")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per session (default 64)")
    parser.add_argument("--decode", type=int, default=32, help="decode steps K (default 32)")
    parser.add_argument("--sessions", default="1,8,32", help="comma list of batch sizes B (default 1,8,32)")
    parser.add_argument("--rules", default="hebbian,gradient")
    parser.add_argument("--pool", choices=["both", "on", "off"], default="both",
                        help="plastic rules with the slot pool, without it, or both (default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rts = variants(args)
    for rt in rts.values():  # warm-up: one short session each, untimed
        run_sessions(rt, torch.randint(0, args.vocab, (2, args.chunk + 1)), 2)
    names = list(rts)
    print(f"threads={torch.get_num_threads()}  hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.layers} layers, vocab {args.vocab}; plastic layers {args.plastic_layers}, chunk {args.chunk}; "
          f"prompt {args.prompt}, decode {args.decode}; min of {args.repeats} interleaved repeats")
    print("decode tok/s (x static):")
    print(f"{'sessions':>8} " + " ".join(f"{n:>22}" for n in names), flush=True)
    rows: dict[int, dict[str, dict[str, float]]] = {}
    for b in [int(x) for x in args.sessions.split(",")]:
        gen = torch.Generator().manual_seed(b)
        prompts = torch.randint(0, args.vocab, (b, args.prompt), generator=gen)
        best = {name: (float("inf"), float("inf")) for name in rts}
        for _ in range(args.repeats):
            for name, rt in rts.items():
                p, d = run_sessions(rt, prompts, args.decode)
                best[name] = (min(best[name][0], p), min(best[name][1], d))
        r = rows[b] = {name: {"prefill_tok_s": b * args.prompt / p, "decode_tok_s": b * args.decode / d}
                       for name, (p, d) in best.items()}
        static = r["none"]["decode_tok_s"]
        cells = [f"{r[n]['decode_tok_s']:>12.1f} ({r[n]['decode_tok_s'] / static:.2f}x)" for n in names]
        print(f"{b:>8} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print("prefill tok/s:")
    for b, r in rows.items():
        print(f"{b:>8} " + " ".join(f"{r[n]['prefill_tok_s']:>22.1f}" for n in names))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "args": vars(args) | {"out": None}}, indent=1))


if __name__ == "__main__":
    main()
