"""Long sessions: does reading a long document keep the fast weights useful, or make the model worse?

    python benchmarks/long_memory_sweep.py                                   # both rules at the defaults, tune part
    python benchmarks/long_memory_sweep.py --rules hebbian --configs "" "decay=0.995" "norm_bound=0.1,layers=last:3"
    python benchmarks/long_memory_sweep.py --split heldout                   # the final check on the held-out part

For each source (TinyStories valid, WikiText-2 valid) and episode, a stretch of the text is read with ``rt.read``
(windows of --window tokens, KV dropped between windows). After 2k/5k/10k/20k tokens the state is copied, its KV
dropped, and two passages are scored with ``adapt=False`` in a fresh context: the document's first --probe tokens
(seen, read longest ago) and --probe tokens of the same source that were not read (unseen, taken past the end of
the stretch). The table gives the change of the mean NLL against a fresh state (S = 0, the base model), averaged
over episodes; a bar: unseen never worse than fresh at any length, seen improved at every length.

Each source's token ids are split: the first 75% is the tune part, the rest the held-out part (a final check of
the chosen defaults, never tuned on). A config is a comma list of ``ar.patch`` options, ``""`` the defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_data import DATA_DIR, data_file

import adapt_runtime as ar

TUNE_FRACTION = 0.75


def parse_config(text: str) -> dict:
    """``"decay=0.998,lr=2"`` -> ``{"decay": 0.998, "lr": 2.0}`` (numbers as floats, ``true``/``false`` as booleans,
    ``a/b/c`` as a list of numbers, e.g. ``layer_rates=0.5/1/2``, else strings). The rules' step options
    (``adapt_runtime.rules.steps``) are options like any other: ``"write_form=delta,norm_bound=0"``,
    ``"normalise=0.005"``, ``"orthogonalise=true"``, ``"momentum=0.5"``, ``"fast_decay=0.9,consolidate=0.05"``."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = (x.strip() for x in part.partition("="))
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        elif "/" in value:
            out[key] = [float(v) for v in value.split("/")]
        else:
            try:
                out[key] = int(value) if value.isdigit() and key == "chunk_size" else float(value)
            except ValueError:
                out[key] = value
    return out


def source_ids(tokenizer, path: Path, split: str) -> list[int]:
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    cut = int(len(ids) * TUNE_FRACTION)
    return ids[:cut] if split == "tune" else ids[cut:]


def episodes(ids: list[int], length: int, probe: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (document, unseen) pairs spread over ``ids``; unseen starts --probe tokens past the document."""
    need = length + 2 * probe
    if len(ids) < need:
        raise ValueError(f"a source part of {len(ids)} tokens is too short for documents of {length} tokens")
    step = max(1, (len(ids) - need) // max(1, count - 1)) if count > 1 else 0
    starts = [min(i * step, len(ids) - need) for i in range(count)]
    return [(torch.tensor(ids[s : s + length]), torch.tensor(ids[s + length + probe : s + length + 2 * probe]))
            for s in starts]


def nll(rt: ar.Runtime, state: ar.FastWeights, ids: torch.Tensor) -> float:
    """Mean next-token NLL of ``ids`` under a copy of ``state`` with a fresh context, not adapting."""
    s = state.clone()
    s.drop_kv()
    logits = rt.forward(ids, s, adapt=False)[0]
    return float(F.cross_entropy(logits[:-1].float(), ids[1:]))


def relative_norms(rt: ar.Runtime, state: ar.FastWeights) -> float:
    """max over layers of ||S|| / ||W0||."""
    norms = state.delta_norms()
    return max(norms[i] / float(torch.linalg.vector_norm(rt.plastic[i].weight0.detach().float())) for i in norms)


def run_episode(rt: ar.Runtime, doc: torch.Tensor, unseen: torch.Tensor, lengths: list[int], probe: int,
                window: int) -> dict[int, dict[str, float]]:
    seen = doc[:probe]
    state = rt.new_state()
    fresh = {"seen": nll(rt, state, seen), "unseen": nll(rt, state, unseen)}
    out = {}
    done = 0
    for n in lengths:
        rt.read(doc[done:n], state, window=window)
        done = n
        out[n] = {"seen": nll(rt, state, seen) / fresh["seen"] - 1, "unseen": nll(rt, state, unseen) / fresh["unseen"]
                  - 1, "norm": relative_norms(rt, state), "refused": state.refused_writes}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of the shared datasets")
    ap.add_argument("--sources", default="tinystories,wikitext2")
    ap.add_argument("--split", choices=("tune", "heldout"), default="tune")
    ap.add_argument("--rules", default="hebbian,gradient")
    ap.add_argument("--configs", nargs="*", default=[""], help='patch options per config, e.g. "decay=0.998"')
    ap.add_argument("--lengths", default="2000,5000,10000,20000")
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--probe", type=int, default=400)
    ap.add_argument("--window", type=int, default=448)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    paths = {source: data_file(source, args.data_dir) for source in args.sources.split(",")}
    model, tokenizer = ar.load_model("llama")
    rows = []
    print(f"split {args.split}, {args.episodes} episodes per source, window {args.window}, probe {args.probe}; "
          "change of mean NLL vs a fresh state (negative = better)")
    print("| source | rule | config | " + " | ".join(f"{n // 1000}k seen / unseen" for n in lengths)
          + " | max ‖S‖/‖W0‖ | unseen ≤ fresh |")
    print("|---|---|---|" + "---|" * len(lengths) + "---|---|")
    for source in args.sources.split(","):
        ids = source_ids(tokenizer, paths[source], args.split)
        eps = episodes(ids, max(lengths), args.probe, args.episodes)
        for rule in args.rules.split(","):
            for text in args.configs:
                options = parse_config(text)
                rt = ar.patch(model, rule=rule, **options)
                started = time.perf_counter()
                try:
                    results = [run_episode(rt, d, u, lengths, args.probe, args.window) for d, u in eps]
                finally:
                    rt.unpatch()
                mean = {n: {k: sum(r[n][k] for r in results) / len(results) for k in ("seen", "unseen", "norm")}
                        for n in lengths}
                worst = max(r[n]["unseen"] for r in results for n in lengths)
                cells = " | ".join(f"{100 * mean[n]['seen']:+.1f}% / {100 * mean[n]['unseen']:+.1f}%" for n in lengths)
                print(f"| {source} | {rule} | {text or 'defaults'} | {cells} | {mean[lengths[-1]]['norm']:.3f} | "
                      f"{'yes' if worst <= 0 else 'NO'} ({100 * worst:+.1f}%) |", flush=True)
                rows.append({"source": source, "rule": rule, "config": options, "split": args.split,
                             "episodes": results, "mean": mean, "worst_unseen": worst,
                             "seconds": time.perf_counter() - started})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
