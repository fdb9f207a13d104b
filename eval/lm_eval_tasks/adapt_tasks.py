"""Document generators for the adapt-eval lm-evaluation-harness task pack (`custom_dataset: !function`).

lm-eval calls each generator as f(**metadata, **dataset_kwargs) (with --model_args keys merged into
metadata), so every generator takes **kwargs. Each document holds its own demonstrations, so a mapping
that changes per episode is learned in context (or in the fast weights); sweep shots with
`--metadata '{"shots": 8}'`. Formats match the native adapt-eval tasks of the same name.
"""

from __future__ import annotations

from typing import Any

from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.words import CATEGORIES, FILLER, NOUNS, SYMBOLS, VALUES


def _dataset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    import datasets

    return {"test": datasets.Dataset.from_list(docs)}


def assoc_recall_docs(shots: int = 8, n: int = 200, seed: int = 0, **_: Any) -> dict[str, Any]:
    """`key: value` lines, then `key:`; choices are the episode's values."""
    docs = []
    k = max(1, int(shots))
    for i in range(int(n)):
        rng = rng_for("lm-eval/assoc-recall", k, seed, i)
        keys = rng.sample(NOUNS, min(k, len(NOUNS)))
        values = rng.sample(VALUES, len(keys)) if len(keys) <= len(VALUES) else [rng.choice(VALUES) for _ in keys]
        query = rng.randrange(len(keys))
        choices = list(dict.fromkeys(values))
        lines = "".join(f"{key}: {value}\n" for key, value in zip(keys, values))
        docs.append({"prompt": f"{lines}{keys[query]}:", "choices": choices,
                     "label": choices.index(values[query])})
    return _dataset(docs)


def label_map_docs(shots: int = 8, n: int = 200, seed: int = 0, variant: str = "symbol", **_: Any) -> dict[str, Any]:
    """Two-class word classification with natural, flipped or symbol labels; demos inside the prompt."""
    if variant not in ("natural", "flipped", "symbol"):
        raise ValueError(f"label-map variant must be natural, flipped or symbol, not {variant!r}")
    docs = []
    for i in range(int(n)):
        rng = rng_for("lm-eval/label-map", variant, shots, seed, i)
        cats = rng.sample(sorted(CATEGORIES), 2)
        labels = {"natural": cats, "flipped": cats[::-1], "symbol": rng.sample(SYMBOLS, 2)}[variant]
        pools = {c: rng.sample(CATEGORIES[c], len(CATEGORIES[c])) for c in cats}
        qc = rng.randrange(2)
        word = pools[cats[qc]].pop()
        demos = [(pools[cats[j % 2]][(j // 2) % len(pools[cats[j % 2]])], j % 2) for j in range(int(shots))]
        rng.shuffle(demos)
        text = "".join(f"Input: {w}\nLabel: {labels[c]}\n" for w, c in demos)
        docs.append({"prompt": f"{text}Input: {word}\nLabel:", "choices": list(labels), "label": qc})
    return _dataset(docs)


def niah_docs(n: int = 100, seed: int = 0, sentences: int = 40, depth: int = 50, **_: Any) -> dict[str, Any]:
    """A magic number at `depth`% of `sentences` filler sentences; 10 numbers to choose from."""
    parts = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    docs = []
    for i in range(int(n)):
        rng = rng_for("lm-eval/niah", depth, sentences, seed, i)
        word = rng.choice(NOUNS)
        numbers = [str(x) for x in rng.sample(range(10**6, 10**7), 10)]
        gold = numbers[0]
        rng.shuffle(numbers)
        hay = [parts[j % len(parts)] for j in range(int(sentences))]
        cut = round(len(hay) * int(depth) / 100)
        text = " ".join([*hay[:cut], f"One of the special magic numbers for {word} is: {gold}.", *hay[cut:]])
        docs.append({"prompt": f"{text}\nWhat is the special magic number for {word}? "
                               f"The special magic number for {word} is:",
                     "choices": numbers, "label": numbers.index(gold)})
    return _dataset(docs)
