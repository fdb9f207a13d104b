"""In-Place TTT on this runtime: the ``inplace-ttt`` rule against the same model's static path, in one run.

    python benchmarks/inplace_ttt.py                  # prefill 2048, greedy decode 256, TTFT of a 256-token prompt
    python benchmarks/inplace_ttt.py --save-checkpoint DIR   # also keep the checkpoint (to run other code on it)

The model is a random-init Qwen3 In-Place TTT checkpoint of the shape issue 22 measured (hidden 512, 8 layers,
intermediate 1536, vocab 32000, 8 heads; TTT layers 0/2/4/6, chunk 256, ``ttt_target`` hidden_states, ``ttt_lr``
0.3), about 61M parameters, built with a fixed seed. "static" is the same checkpoint patched with rule ``none``
(every TTT layer an ordinary down_proj). Each measurement runs in rounds that alternate the two variants; the
minimum of ``--rounds`` rounds (after one warm-up) is kept, so a busy machine slows both alike. Greedy decode
continues the 2048-token prefill; the tokens of the two variants are printed as a checksum.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

import adapt_runtime as ar

TTT_LAYERS = [0, 2, 4, 6]


def build_checkpoint(folder: Path, seed: int = 0) -> None:
    config = Qwen3Config(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, vocab_size=32000,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta.update(ttt_layers=TTT_LAYERS, ttt_chunk=256, ttt_lr=0.3, ttt_target="hidden_states")
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    d = config.hidden_size
    weights = {}
    for i in TTT_LAYERS:
        weights[f"model.layers.{i}.mlp.ttt_conv.weight"] = torch.randn(d, 1, 5) * 0.2
        weights[f"model.layers.{i}.mlp.ttt_proj.weight"] = torch.randn(d, d) / d**0.5
    save_file(weights, str(folder / "ttt.safetensors"))


def best_of(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    best = {name: float("inf") for name in fns}
    for round_ in range(rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--ttft-prompt", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-checkpoint", type=Path, help="build the checkpoint here and keep it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.save_checkpoint or Path(tempfile.mkdtemp(prefix="inplace-ttt-"))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        build_checkpoint(folder)
    runtimes = {}
    for name, rule in (("static", "none"), ("ttt", "inplace-ttt")):
        model, _ = ar.load_model(str(folder), dtype="float32")
        runtimes[name] = ar.patch(model, rule=rule, layers=TTT_LAYERS) if rule == "none" else ar.patch(model, rule=rule)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 32000, (args.prefill,), generator=g)

    def prefill(rt: ar.Runtime, ids: torch.Tensor) -> ar.FastWeights:
        state = rt.new_state()
        with torch.inference_mode():
            rt.forward(ids[None], state)
        return state

    def first_token(rt: ar.Runtime) -> None:
        with torch.inference_mode():
            next(iter(rt.generate(prompt[: args.ttft_prompt][None], rt.new_state(), max_new_tokens=1)))

    tokens: dict[str, list[int]] = {}

    def decode(name: str) -> Callable[[], None]:
        rt = runtimes[name]

        def run() -> None:
            state = prefill(rt, prompt[:-1])  # decode starts from the prompt's last token
            with torch.inference_mode():
                out = [int(t) for t in rt.generate(prompt[-1:][None], state, max_new_tokens=args.decode)]
            tokens[name] = out

        return run

    pre = best_of({n: (lambda rt=rt: prefill(rt, prompt)) for n, rt in runtimes.items()}, args.rounds)
    ttft = best_of({n: (lambda rt=rt: first_token(rt)) for n, rt in runtimes.items()}, args.rounds)
    dec_total = best_of({n: decode(n) for n in runtimes}, max(1, args.rounds - 1))
    # decode alone: the decode run minus its prefill of len-1 tokens (measured the same way)
    pre_short = best_of({n: (lambda rt=rt: prefill(rt, prompt[:-1])) for n, rt in runtimes.items()}, args.rounds)
    print(f"In-Place TTT checkpoint (hidden 512, 8 layers, TTT layers {TTT_LAYERS}, chunk 256), "
          f"{args.threads} threads, min of {args.rounds} rounds")
    print("| | static (rule none) | inplace-ttt | ttt / static |")
    print("|---|---|---|---|")
    p = {n: args.prefill / pre[n] for n in runtimes}
    d = {n: args.decode / max(1e-9, dec_total[n] - pre_short[n]) for n in runtimes}
    print(f"| prefill tok/s ({args.prefill}) | {p['static']:.0f} | {p['ttt']:.0f} | {p['ttt'] / p['static']:.2f}x |")
    print(f"| decode tok/s ({args.decode}, greedy) | {d['static']:.1f} | {d['ttt']:.1f} | "
          f"{d['ttt'] / d['static']:.2f}x |")
    print(f"| TTFT ({args.ttft_prompt}-token prompt) | {ttft['static']:.3f} s | {ttft['ttt']:.3f} s | "
          f"{ttft['ttt'] / ttft['static']:.2f}x |")
    print(f"greedy tokens: ttt {tokens['ttt'][:8]}... static {tokens['static'][:8]}... (checkpoint: {folder})")


if __name__ == "__main__":
    main()
