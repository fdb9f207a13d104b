"""In-Place TTT on this runtime: the ``inplace-ttt`` rule against the same model's static path, in one run.

    python benchmarks/inplace_ttt.py                  # prefill 2048, greedy decode 256, TTFT of a 256-token prompt
    python benchmarks/inplace_ttt.py --save-checkpoint DIR   # also keep the checkpoint (to run other code on it)
    python benchmarks/inplace_ttt.py --segments       # also the rule read segment by segment (no one-pass prefill)
    python benchmarks/inplace_ttt.py --tokens-out T.json     # keep the greedy tokens (to compare with other code)
    python benchmarks/inplace_ttt.py --rule hebbian --rule-config '{"target": "output"}' --layers 6

The model is a random-init Qwen3 In-Place TTT checkpoint of the shape issue 22 measured (hidden 512, 8 layers,
intermediate 1536, vocab 32000, 8 heads; TTT layers 0/2/4/6, chunk 256, ``ttt_target`` hidden_states, ``ttt_lr``
0.3), about 61M parameters, built with a fixed seed. "static" is the same checkpoint patched with rule ``none``
(every TTT layer an ordinary down_proj). Each measurement runs in rounds that alternate the two variants; the
minimum of ``--rounds`` rounds (after one warm-up) is kept, so a busy machine slows both alike. Greedy decode
continues the 2048-token prefill; the tokens of the two variants are printed as a checksum. ``--rule`` measures
another rule on the same checkpoint (``--rule-config``: its options as JSON; ``--layers``: its plastic layers, also
the static variant's; ``--chunk``: the chunk size, default the checkpoint's 256); ``--segments`` adds the rule with
the one-pass prefill of layer-local rules turned off (``Runtime.one_pass = False``), the path they took before it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from speed import interleaved  # min wall time per variant over alternating rounds
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--ttft-prompt", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-checkpoint", type=Path, help="build the checkpoint here and keep it")
    parser.add_argument("--rule", default="inplace-ttt")
    parser.add_argument("--rule-config", default="{}", help="the rule's options as JSON")
    parser.add_argument("--layers", default=None, help="plastic layers, e.g. 6 or 0,2,4,6 (default: TTT layers)")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--segments", action="store_true", help="also the rule without the one-pass prefill")
    parser.add_argument("--tokens-out", type=Path, help="write every variant's greedy tokens here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.save_checkpoint or Path(tempfile.mkdtemp(prefix="inplace-ttt-"))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        build_checkpoint(folder)
    layers = TTT_LAYERS if args.layers is None else [int(i) for i in args.layers.split(",")]
    runtimes = {}
    variants = [("static", "none"), ("ttt", args.rule)] + ([("segments", args.rule)] if args.segments else [])
    for name, rule in variants:
        model, _ = ar.load_model(str(folder), dtype="float32")
        if rule == "none":
            runtimes[name] = ar.patch(model, rule=rule, layers=layers, chunk_size=args.chunk)
        elif rule == "inplace-ttt" and args.layers is None:
            runtimes[name] = ar.patch(model, rule=rule, chunk_size=args.chunk, **json.loads(args.rule_config))
        else:
            runtimes[name] = ar.patch(model, rule=rule, layers=layers, chunk_size=args.chunk,
                                      **json.loads(args.rule_config))
        runtimes[name].one_pass = name != "segments"
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

    pre = interleaved({n: (lambda rt=rt: prefill(rt, prompt)) for n, rt in runtimes.items()}, args.rounds)
    ttft = interleaved({n: (lambda rt=rt: first_token(rt)) for n, rt in runtimes.items()}, args.rounds)
    dec_total = interleaved({n: decode(n) for n in runtimes}, max(1, args.rounds - 1))
    # decode alone: the decode run minus its prefill of len-1 tokens (measured the same way)
    pre_short = interleaved({n: (lambda rt=rt: prefill(rt, prompt[:-1])) for n, rt in runtimes.items()}, args.rounds)
    rt = runtimes["ttt"]
    print(f"In-Place TTT checkpoint (hidden 512, 8 layers), rule {args.rule} {rt.rule.options()} on layers "
          f"{list(rt.config.layers)}, chunk {rt.config.chunk_size}, {args.threads} threads, "
          f"min of {args.rounds} rounds")
    names = [n for n, _ in variants]
    head = {"static": "static (rule none)", "ttt": f"{args.rule} (one pass: {rt._one_pass_rule()})",
            "segments": f"{args.rule} (segments)"}
    print("| | " + " | ".join(head[n] for n in names) + " | " + " | ".join(f"{n} / static" for n in names[1:])
          + " |")
    print("|---" * (2 * len(names)) + "|")
    p = {n: args.prefill / pre[n] for n in runtimes}
    d = {n: args.decode / max(1e-9, dec_total[n] - pre_short[n]) for n in runtimes}
    t = {n: 1 / ttft[n] for n in runtimes}  # ratios of rates: > 1 is faster than static

    def line(label: str, values: dict[str, float], fmt: str) -> None:
        print(f"| {label} | " + " | ".join(format(values[n], fmt) for n in names) + " | "
              + " | ".join(f"{values[n] / values['static']:.2f}x" for n in names[1:]) + " |")

    line(f"prefill tok/s ({args.prefill})", p, ".0f")
    line(f"decode tok/s ({args.decode}, greedy)", d, ".1f")
    line(f"1 / TTFT ({args.ttft_prompt}-token prompt; TTFT s: "
         + ", ".join(f"{n} {ttft[n]:.3f}" for n in names) + ")", t, ".2f")
    print("greedy tokens: " + ", ".join(f"{n} {tokens[n][:8]}..." for n in names) + f" (checkpoint: {folder})")
    if args.tokens_out is not None:
        args.tokens_out.write_text(json.dumps(tokens))


if __name__ == "__main__":
    main()
