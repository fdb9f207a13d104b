"""How much of a session's memory a rank-r LoRA adapter keeps (bundled model, a session that read a document).

    python benchmarks/lora_rank.py                 # 2000 TinyStories tokens, hebbian defaults, ranks 1..32 and full
    python benchmarks/lora_rank.py --layers all --norm-bound 0     # every layer, no bound on ||S||
    python benchmarks/lora_rank.py --rule gradient --tokens 4000

A fresh session reads the first --tokens tokens of the TinyStories validation text with ``rt.forward`` (windows of
448 tokens, the KV cache dropped between them, S learning throughout). Its fast weights are exported at each rank
with ``ar.export_lora`` and the adapter read back with ``ar.import_lora`` (and by PEFT into the unpatched model,
when peft is installed). Per rank: each layer's relative Frobenius error ||S - B A|| / ||S||, the max abs logit
difference against the runtime with the session's own S on the next 448 held-out tokens (adapt=False, fresh
context), the mean next-token NLL there, and the share of the session's NLL gain over the static model it keeps.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_data import data_file

import adapt_runtime as ar

WINDOW = 448  # 14 chunks of 32, under the bundled model's 512 positions


def read(rt, state, ids: list[int]) -> None:
    for start in range(0, len(ids), WINDOW):
        state.drop_kv()
        rt.forward(ids[start : start + WINDOW], state)


def logits_with(rt, state, ids: list[int]) -> torch.Tensor:
    probe = state.clone()
    probe.drop_kv()
    return rt.forward(ids, probe, adapt=False)[0]


def nll(logits: torch.Tensor, ids: list[int]) -> float:
    return float(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rule", default="hebbian")
    parser.add_argument("--ranks", default="1,2,4,8,16,32")
    parser.add_argument("--layers", default=None, help="plastic layers (default: the rule's)")
    parser.add_argument("--norm-bound", type=float, default=None, help="||S|| bound (default: the rule's; 0: none)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = data_file("tinystories")
    model, tokenizer = ar.load_model("llama")
    base = copy.deepcopy(model)
    ids = tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    doc, held_out = [tokenizer.bos_token_id, *ids[: args.tokens]], [tokenizer.bos_token_id, *ids[args.tokens :]]
    held_out = held_out[:WINDOW]
    rt = ar.patch(model, rule=args.rule, layers=args.layers, norm_bound=args.norm_bound)
    state = rt.new_state()
    read(rt, state, doc)
    reference = logits_with(rt, state, held_out)
    static = logits_with(rt, rt.new_state(), held_out)
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = None
    layers = list(rt.config.layers)
    static_nll = nll(static, held_out)
    print(f"{rt}, norm_bound {rt.config.norm_bound}: {len(doc)} tokens read, {state.writes} writes; "
          f"held-out NLL: static {nll(static, held_out):.4f}, session {nll(reference, held_out):.4f}; "
          f"static vs session max |logit diff| {float((static - reference).abs().max()):.3f}\n")
    header = ("| rank | " + " | ".join(f"layer {i} rel. error" for i in layers)
              + " | max abs logit diff | NLL | NLL gain kept |")
    if PeftModel is not None:
        header += " PEFT max abs logit diff |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    ranks: list[int | None] = [int(r) for r in args.ranks.split(",")] + [None]
    with tempfile.TemporaryDirectory() as tmp:
        for rank in ranks:
            folder = Path(tmp) / str(rank)
            info = ar.export_lora(rt, state, folder, rank=rank)
            got = logits_with(rt, ar.import_lora(rt, folder), held_out)
            label = f"full ({info.rank})" if rank is None else str(rank)
            cells = [label, *(f"{info.rel_error[i]:.2e}" if rank is None else f"{info.rel_error[i]:.3f}"
                              for i in layers),
                     f"{float((got - reference).abs().max()):.2e}", f"{nll(got, held_out):.4f}",
                     f"{(static_nll - nll(got, held_out)) / (static_nll - nll(reference, held_out)):.1%}"]
            if PeftModel is not None:
                peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
                with torch.no_grad():
                    peft = peft_model(torch.tensor([held_out])).logits[0]
                cells.append(f"{float((peft - reference).abs().max()):.2e}")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
