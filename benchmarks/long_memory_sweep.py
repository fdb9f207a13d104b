"""Long sessions: does reading a long document keep the fast weights useful, or make the model worse?

    python benchmarks/long_memory_sweep.py                                   # both rules at the defaults, tune part
    python benchmarks/long_memory_sweep.py --rules hebbian --configs "" "decay=0.995" "norm_bound=0.1,layers=last:3"
    python benchmarks/long_memory_sweep.py --split heldout                   # the final check on the held-out part
    python benchmarks/long_memory_sweep.py --episodes 4 --windows 32 --reread 8 --threads 1   # + the other protocols
    python benchmarks/long_memory_sweep.py --split heldout --sources tinystories --rules none,gradient,learned@DIR

For each source (TinyStories valid, WikiText-2 valid) and episode, a stretch of the text is read with ``rt.read``
(windows of --window tokens, KV dropped between windows). After 2k/5k/10k/20k tokens the state is copied, its KV
dropped, and two passages are scored with ``adapt=False`` in a fresh context: the document's first --probe tokens
(seen, read longest ago) and --probe tokens of the same source that were not read (unseen, taken past the end of
the stretch). The table gives the change of the mean NLL against a fresh state (S = 0, the base model), averaged
over episodes; a bar: unseen never worse than fresh at any length, seen improved at every length.

Each cell is the mean over episodes with the half-width of its 95% CI (t-based, episodes as clusters:
``adapt_runtime.eval.stats.mean_ci`` of the per-episode change, each episode paired with its own fresh state).

Two more protocols on the same part of each source (``--windows``, ``--reread``; 0 turns one off):

* 512-window: --windows windows of 512 tokens (BOS first; the even ones of the part cut into consecutive 511-token
  pieces, spread over it), each read from a fresh state with the rule adapting; the change of the mean NLL against
  static (S = 0), paired per window, with its 95% CI.
* re-read: --reread passages of --reread-len tokens; a fresh session reads one (a single ``rt.forward``, adapting),
  then scores it again with a fresh context and ``adapt=False``; the change against a fresh state, with its CI.

Each source's token ids are split: the first 75% is the tune part, the rest the held-out part (a final check of
the chosen defaults, never tuned on; ``heldout_split.py`` writes the two parts as files, e.g. to train on the tune
part alone). A config is a comma list of ``ar.patch`` options, ``""`` the defaults.

A rule may name its own model, ``RULE@MODEL`` (an alias or a folder, e.g. ``learned@runs/a/step-000240``, a
checkpoint of ``adapt-train``; the same tokenizer as --model). Every change, of every row, is against the fresh
state of --model (the bundled stories260K by default) on the same episode, so a trained model's row holds what its
base weights changed as well as what its fast weights remember (``none@MODEL``: the base weights' change alone).
``--versus ROW`` (a rule as written in --rules, e.g. ``gradient``) adds each row's paired difference from that row,
per episode, with its 95% CI.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from adapt_runtime.eval.stats import mean_ci
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


def cell(values: list[float]) -> str:
    """``-12.3% ±1.4`` : the mean of per-episode relative changes and its 95% CI half-width (in points)."""
    est = mean_ci(values)
    half = "" if est.ci95 is None else f" ±{100 * (est.ci95[1] - est.mean):.1f}"
    return f"{100 * est.mean:+.1f}%{half}"


def spread(ids: list[int], length: int, count: int, every: int = 1) -> list[list[int]]:
    """``count`` pieces of ``length`` tokens spread over ``ids`` (of the consecutive pieces, every ``every``-th)."""
    pieces = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][::every]
    stride = max(1, len(pieces) // max(1, count))
    return pieces[::stride][:count]


def window_changes(rt: ar.Runtime, wins: list[torch.Tensor], static: list[float]) -> list[float]:
    """Per window: (NLL reading it from a fresh state, adapting) - (static NLL), in nats."""
    out = []
    for w, base in zip(wins, static):
        logits = rt.forward(w, rt.new_state())[0]
        out.append(float(F.cross_entropy(logits[:-1].float(), w[1:])) - base)
    return out


def reread_changes(rt: ar.Runtime, passages: list[torch.Tensor], fresh: list[float]) -> list[float]:
    """Per passage: relative change of its NLL after a fresh session read it once, vs ``fresh`` (its NLL under the
    reference model's fresh state)."""
    out = []
    for p, base in zip(passages, fresh):
        state = rt.new_state()
        rt.forward(p, state)
        out.append(nll(rt, state, p) / base - 1)
    return out


def fresh_nlls(rt: ar.Runtime, doc: torch.Tensor, unseen: torch.Tensor, probe: int) -> dict[str, float]:
    """The episode's seen (the document's first ``probe`` tokens) and unseen NLL under a fresh state."""
    state = rt.new_state()
    return {"seen": nll(rt, state, doc[:probe]), "unseen": nll(rt, state, unseen)}


def run_episode(rt: ar.Runtime, doc: torch.Tensor, unseen: torch.Tensor, lengths: list[int], probe: int,
                window: int, fresh: dict[str, float]) -> dict[int, dict[str, float]]:
    """Per length: the seen and unseen NLL after reading that much of ``doc`` (``*_nll``), and their relative change
    against ``fresh`` (the reference model's fresh state on this episode)."""
    seen = doc[:probe]
    state = rt.new_state()
    out = {}
    done = 0
    for n in lengths:
        rt.read(doc[done:n], state, window=window)
        done = n
        got = {"seen": nll(rt, state, seen), "unseen": nll(rt, state, unseen)}
        out[n] = {"seen": got["seen"] / fresh["seen"] - 1, "unseen": got["unseen"] / fresh["unseen"] - 1,
                  "seen_nll": got["seen"], "unseen_nll": got["unseen"], "norm": relative_norms(rt, state),
                  "refused": state.refused_writes}
    return out


def split_rule(text: str) -> tuple[str, str | None]:
    """``"learned@DIR"`` -> ``("learned", "DIR")``; ``"gradient"`` -> ``("gradient", None)``."""
    rule, _, model = text.partition("@")
    return rule, (model or None)


def paired(a: list[float], b: list[float]) -> str:
    """``-1.2 ±0.8``: the mean of the per-episode differences a - b, in points, with its 95% CI half-width."""
    est = mean_ci([x - y for x, y in zip(a, b)])
    half = "" if est.ci95 is None else f" ±{100 * (est.ci95[1] - est.mean):.1f}"
    return f"{100 * est.mean:+.1f}{half}"


def print_versus(rows: list[dict], versus: str, lengths: list[int]) -> None:
    """Each row's paired per-episode difference from the row of rule ``versus`` (same source and config), in
    points of the relative change against the reference fresh state."""
    print(f"\npaired difference from {versus} (points; negative: lower NLL than {versus}), mean ±95% CI over episodes")
    print("| source | rule | config | " + " | ".join(f"{n // 1000}k seen / unseen" for n in lengths) + " |")
    print("|---|---|---|" + "---|" * len(lengths))
    for row in rows:
        ref = next((r for r in rows if r["rule"] == versus and r["source"] == row["source"]
                    and r["config_text"] == row["config_text"]), None)
        if ref is None or ref is row:
            continue
        cells = " | ".join(" / ".join(paired([e[n][k] for e in row["episodes"]], [e[n][k] for e in ref["episodes"]])
                                      for k in ("seen", "unseen")) for n in lengths)
        print(f"| {row['source']} | {row['rule']} | {row['config_text'] or 'defaults'} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of the shared datasets")
    ap.add_argument("--sources", default="tinystories,wikitext2")
    ap.add_argument("--split", choices=("tune", "heldout"), default="tune")
    ap.add_argument("--model", default="llama", help="the reference model: every change is against its fresh state")
    ap.add_argument("--rules", default="hebbian,gradient", help="comma list of RULE or RULE@MODEL (its own model)")
    ap.add_argument("--versus", default=None, help="also print each row's paired difference from this row's")
    ap.add_argument("--configs", nargs="*", default=[""], help='patch options per config, e.g. "decay=0.998"')
    ap.add_argument("--lengths", default="2000,5000,10000,20000")
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--probe", type=int, default=400)
    ap.add_argument("--window", type=int, default=448)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=0, help="512-token windows per source (0: skip the protocol)")
    ap.add_argument("--reread", type=int, default=0, help="re-read passages per source (0: skip the protocol)")
    ap.add_argument("--reread-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    paths = {source: data_file(source, args.data_dir) for source in args.sources.split(",")}
    model, tokenizer = ar.load_model(args.model)
    models = {None: model}
    for _, name in map(split_rule, args.rules.split(",")):
        if name is not None and name not in models:
            models[name], other = ar.load_model(name)
            if other.get_vocab() != tokenizer.get_vocab():
                ap.error(f"{name}: its tokenizer is not that of --model {args.model}")
    rows = []
    print(f"split {args.split}, {args.episodes} episodes per source, window {args.window}, probe {args.probe}; "
          "change of mean NLL vs a fresh state (negative = better)")
    extra = ([f"512-window ({args.windows})"] if args.windows else []) + ([f"re-read ({args.reread})"]
                                                                          if args.reread else [])
    print("| source | rule | config | " + " | ".join(f"{n // 1000}k seen / unseen" for n in lengths)
          + " | max ‖S‖/‖W0‖ | unseen ≤ fresh (worst episode) | " + "".join(f"{e} | " for e in extra))
    print("|---|---|---|" + "---|" * (len(lengths) + 2 + len(extra)))
    for source in args.sources.split(","):
        ids = source_ids(tokenizer, paths[source], args.split)
        eps = episodes(ids, max(lengths), args.probe, args.episodes)
        bos = tokenizer.bos_token_id
        wins = [torch.tensor([bos, *w]) for w in spread(ids, 511, args.windows, every=2)] if args.windows else []
        passages = [torch.tensor([bos, *p]) for p in spread(ids, args.reread_len - 1, args.reread, every=3)]
        passages = passages if args.reread else []
        static: list[float] = []
        rt = ar.patch(model, rule="none")
        try:
            fresh = [fresh_nlls(rt, d, u, args.probe) for d, u in eps]
            fresh_passages = [nll(rt, rt.new_state(), p) for p in passages]
            static = [float(F.cross_entropy(rt.forward(w, rt.new_state(), adapt=False)[0][:-1].float(), w[1:]))
                      for w in wins]
        finally:
            rt.unpatch()
        for label in args.rules.split(","):
            rule, model_name = split_rule(label)
            for text in args.configs:
                options = parse_config(text)
                rt = ar.patch(models[model_name], rule=rule, **options)
                started = time.perf_counter()
                try:
                    results = [run_episode(rt, d, u, lengths, args.probe, args.window, f)
                               for (d, u), f in zip(eps, fresh)]
                    window_deltas = window_changes(rt, wins, static)
                    rereads = reread_changes(rt, passages, fresh_passages)
                finally:
                    rt.unpatch()
                mean = {n: {k: sum(r[n][k] for r in results) / len(results) for k in ("seen", "unseen", "norm")}
                        for n in lengths}
                worst = max(r[n]["unseen"] for r in results for n in lengths)
                cells = " | ".join(f"{cell([r[n]['seen'] for r in results])} / "
                                   f"{cell([r[n]['unseen'] for r in results])}" for n in lengths)
                others = ""
                row = {"source": source, "rule": label, "model": model_name or args.model, "config": options,
                       "config_text": text, "split": args.split, "episodes": results, "fresh": fresh,
                       "mean": mean, "worst_unseen": worst}
                if wins:
                    base = sum(static) / len(static)
                    est = mean_ci(window_deltas)
                    half = "" if est.ci95 is None else f" ±{est.ci95[1] - est.mean:.3f}"
                    others += f"{100 * est.mean / base:+.2f}% ({est.mean:+.3f}{half} nats) | "
                    row["windows"] = {"static": static, "delta": window_deltas, "rel": est.mean / base}
                if rereads:
                    others += f"{cell(rereads)} | "
                    row["reread"] = rereads
                print(f"| {source} | {label} | {text or 'defaults'} | {cells} | {mean[lengths[-1]]['norm']:.3f} | "
                      f"{'yes' if worst <= 0 else 'NO'} ({100 * worst:+.1f}%) | {others}", flush=True)
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
    if args.versus is not None:
        print_versus(rows, args.versus, lengths)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
