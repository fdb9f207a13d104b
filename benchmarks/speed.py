"""Speed of plastic vs static inference, ratios side by side in one run.

    python benchmarks/speed.py            # prefill 2048 tokens (chunk 256) and decode, on a random-init Llama
                                          # (hidden 512, 8 layers, intermediate 1536, vocab 32000)

Static is the same model unpatched (HF forward with a KV cache); plastic is ``rt.forward`` with each rule at its
defaults except the chunk size. Decode is greedy, one token per step, after a short prompt. Each variant has its own
copy of the model (same seed, same weights); repeats are interleaved (static, hebbian, gradient, static, ...) and
the minimum time is kept, so a busy machine slows every variant alike. Also prints the bytes of one session's fast
weights (float32) for the down_proj shapes of Llama-3.2-1B and Llama-3-8B, all layers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from long_memory_sweep import parse_config
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import adapt_runtime as ar

SHAPES = {"Llama-3.2-1B": (16, 2048, 8192), "Llama-3-8B": (32, 4096, 14336)}  # layers, d, f


def build(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, vocab_size=32000,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Minimum wall time of each function over ``repeats`` interleaved rounds (after one warm-up round)."""
    best = {name: float("inf") for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def static_prefill(model, ids):
    with torch.no_grad():
        model(ids[None], past_key_values=DynamicCache(config=model.config), use_cache=True)


def static_decode(model, prompt, steps):
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(prompt[None], past_key_values=cache, use_cache=True).logits[0, -1]
        for _ in range(steps):
            tok = logits.argmax().view(1, 1)
            logits = model(tok, past_key_values=cache, use_cache=True).logits[0, -1]


def plastic_decode(rt, prompt, steps):
    state = rt.new_state()
    for _ in rt.generate(prompt, state, max_new_tokens=steps + 1):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="prefill length (default 2048)")
    parser.add_argument("--chunk", type=int, default=256, help="chunk size (default 256)")
    parser.add_argument("--decode", type=int, default=512,
                        help="decode steps after a 16-token prompt (default 512: two chunk writes at chunk 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--variants", nargs="+", default=["hebbian", "gradient"],
                        help='plastic variants, each a rule at its defaults or RULE:OPTIONS with ar.patch options as '
                             'long_memory_sweep.py takes them, e.g. "hebbian:write_form=plain,norm_bound=0.05"; '
                             '"hebbian:record_retrieval=false" sets rt.record_retrieval (the delta form\'s retrieval '
                             'formed at the write)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.randint(0, 32000, (args.tokens,), generator=torch.Generator().manual_seed(0))
    prompt = ids[:16]
    static = build()
    runtimes = {}
    for variant in args.variants:
        rule, _, text = variant.partition(":")
        options = parse_config(text)
        record = options.pop("record_retrieval", True)  # a runtime setting, not a patch option
        runtimes[variant] = ar.patch(build(), rule=rule, chunk_size=args.chunk, **options)
        runtimes[variant].record_retrieval = bool(record)
    prefill = {"static": lambda: static_prefill(static, ids)}
    decode = {"static": lambda: static_decode(static, prompt, args.decode)}
    for rule, rt in runtimes.items():
        prefill[rule] = lambda rt=rt: rt.forward(ids, rt.new_state())
        decode[rule] = lambda rt=rt: plastic_decode(rt, prompt, args.decode)
    prefill_s, decode_s = interleaved(prefill, args.repeats), interleaved(decode, args.repeats)
    rows = {name: {"prefill_s": prefill_s[name], "decode_s": decode_s[name]} for name in prefill}
    base = rows["static"]
    print(f"threads={torch.get_num_threads()}  prefill {args.tokens} tokens, chunk {args.chunk}; decode {args.decode}; "
          f"min of {args.repeats} interleaved repeats")
    width = max(10, *map(len, rows))
    print(f"{'':{width}} {'prefill tok/s':>14} {'x static':>9} {'decode tok/s':>13} {'x static':>9}")
    for name, r in rows.items():
        r["prefill_tok_s"] = args.tokens / r["prefill_s"]
        r["decode_tok_s"] = args.decode / r["decode_s"]
        r["prefill_ratio"] = base["prefill_s"] / r["prefill_s"]
        r["decode_ratio"] = base["decode_s"] / r["decode_s"]
        print(f"{name:{width}} {r['prefill_tok_s']:>14.0f} {r['prefill_ratio']:>8.2f}x {r['decode_tok_s']:>13.1f} "
              f"{r['decode_ratio']:>8.2f}x")
    print("\nfast-weight state per session (float32, every layer's down_proj):")
    memory = {}
    for name, (layers, d, f) in SHAPES.items():
        memory[name] = layers * d * f * 4
        print(f"  {name:14} {layers} x {d} x {f} -> {memory[name] / 2**30:.2f} GiB "
              f"({memory[name] / layers / 2**20:.0f} MiB per layer)")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "state_bytes": memory, "args": vars(args) | {"out": None}},
                                       indent=1))


if __name__ == "__main__":
    main()
