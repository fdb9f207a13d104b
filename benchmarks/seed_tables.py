"""The seed paper's tables side by side: Chaudhary (2025, arXiv 2510.21908) static vs hebbian vs gradient plasticity
on its synthetic tasks, with this project's training machinery (``adapt_runtime.train``), beside its published
numbers.

    python benchmarks/seed_tables.py --task copy --task regression --task cue --seeds 3 --out runs/seed_tables.json

The setup follows their repository (sidcraftscode/hebbian-transformer; facts read from its configs, model and
training loops, no code carried over): a 2-layer pre-LayerNorm decoder, d_model 128, 4 heads, FFN 256, GELU,
dropout 0.1, no positional encoding, fed vectors through a linear input projection and read out by a linear head;
AdamW (lr 1e-3, weight decay 1e-4), gradient clipping at 5, one episode per optimizer step with the loss summed over
the episode's steps; each rule trained and evaluated on fresh random episodes. The plastic rule is the runtime's
learned rule with Chaudhary's pieces (``PlasticityConfig``): per-token writes (chunk size 1, apply then write),
``S <- (1 - eta_t) S + eta_t alpha . Delta_t``, ``eta_t = 0.2 sigmoid(eta~_t) min(1, 1/||Delta_t||)``
(``modulation="gate"``, ``norm="delta"``, decay fixed at 1), per-connection ``alpha`` (``rate x alpha`` = 0.02 at
init, their ``alpha_init``); ``Delta`` is post x pre of the down projection (``hebbian``, ``target="output"``) or,
for ``gradient``, minus the gradient of a learned internal loss of the outputs (``inner="internal"``).

Where it differs from theirs (see the README's table): their writes run under ``no_grad`` (alpha, the eta head and
the internal loss are never trained); ours are trained through the writes (backprop through S, ``create_graph``
for the gradient form). Only the FFN's down projection is plastic here (they make both FFN projections plastic,
with plastic biases too); eta~ is read per layer from the MLP input (theirs from one extra output of the head);
the gradient form descends the internal loss (theirs adds the gradient, i.e. ascends). The decoder is HF's GPT-2
block (pre-LayerNorm, GELU) with its position embeddings zeroed and frozen, and an lm_head without bias.

Tasks (data generated as their repository does): ``copy`` (5 tokens from 8 symbols, 20 blanks, a delimiter, 5 recall
steps; metrics: mean CE over all 31 steps and their "recall" accuracy over the second half of the steps, which
includes 11 blank steps; we also give the accuracy on the 5 recalled tokens alone), ``regression`` (y = w.x + b,
x in R^3, 10 support pairs then 10 queries; metrics: MSE over all steps and over the queries), ``cue`` (8 of 20
cues shown with a reward in [0, 1], then queried in the same order; metric: query MSE).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from tqdm import tqdm

from adapt_runtime.train import PlasticityConfig, PlasticLM, RuleParams
from adapt_runtime.train.forward import down_shapes

RULES = ("none", "hebbian", "gradient")
SOURCE = "Chaudhary 2025 (arXiv 2510.21908), experiments/results/*.json of sidcraftscode/hebbian-transformer"


@dataclass(frozen=True)
class Task:
    """One of their tasks: input and output widths, their episode counts and their published numbers."""

    name: str
    inputs: int
    outputs: int
    episodes: int  # their dataset_size: fresh random episodes per epoch (train) and in the evaluation
    epochs: int
    metrics: tuple[str, ...]
    published: dict[str, dict[str, float]]


TASKS = {
    "copy": Task(
        "copy",
        10,
        10,
        50,
        2,
        ("loss", "recall", "recall_tokens"),
        {
            "gradient": {"loss": 0.352, "recall": 0.745},
            "hebbian": {"loss": 0.345, "recall": 0.727},
            "none": {"loss": 0.415, "recall": 0.721},
        },
    ),
    "regression": Task(
        "regression",
        5,
        1,
        150,
        5,
        ("val_mse", "query_mse"),
        {
            "gradient": {"val_mse": 0.823, "query_mse": 1.589},
            "hebbian": {"val_mse": 0.798, "query_mse": 1.546},
            "none": {"val_mse": 1.031, "query_mse": 1.997},
        },
    ),
    "cue": Task(
        "cue",
        22,
        1,
        100,
        4,
        ("query_mse",),
        {"gradient": {"query_mse": 0.064}, "hebbian": {"query_mse": 0.065}, "none": {"query_mse": 0.053}},
    ),
}


# ---- the tasks' data, as their repository generates it ------------------------------------------------------------


def copy_episodes(n: int, g: torch.Generator, length: int = 5, delay: int = 20, vocab: int = 10):
    """``(one-hot inputs [n, T, vocab], targets [n, T])``: symbols 1..vocab-2, blanks 0, the delimiter vocab-1;
    the targets are 0 except the last ``length`` steps, which are the symbols."""
    seq = torch.randint(1, vocab - 1, (n, length), generator=g)
    zeros = torch.zeros(n, delay, dtype=torch.long)
    ids = torch.cat([seq, zeros, torch.full((n, 1), vocab - 1), torch.zeros(n, length, dtype=torch.long)], 1)
    targets = torch.cat([torch.zeros(n, length + delay + 1, dtype=torch.long), seq], 1)
    return F.one_hot(ids, vocab).float(), targets


def regression_episodes(n: int, g: torch.Generator, dim: int = 3, support: int = 10, query: int = 10):
    """``(inputs [n, T, dim + 2], targets [n, T])``: a random linear function per episode; support steps show
    ``(x, y, 0)`` with target 0, query steps ``(x, 0, 1)`` with target y."""
    w = torch.randn(n, dim, generator=g)
    b = torch.randn(n, 1, generator=g)
    T = support + query
    x = torch.randn(n, T, dim, generator=g)
    y = (x * w[:, None]).sum(-1) + b
    inputs = torch.zeros(n, T, dim + 2)
    inputs[..., :dim] = x
    inputs[:, :support, dim] = y[:, :support]
    inputs[:, support:, dim + 1] = 1.0
    targets = torch.zeros(n, T)
    targets[:, support:] = y[:, support:]
    return inputs, targets


def cue_episodes(n: int, g: torch.Generator, pairs: int = 8, cues: int = 20):
    """``(inputs [n, 2 pairs, cues + 2], targets [n, 2 pairs])``: ``pairs`` distinct cues shown with a reward in
    [0, 1) (target 0), then each cue queried in the same order (query flag 1, target its reward)."""
    order = torch.rand(n, cues, generator=g).argsort(-1)[:, :pairs]
    rewards = torch.rand(n, pairs, generator=g)
    onehot = F.one_hot(order, cues).float()
    inputs = torch.zeros(n, 2 * pairs, cues + 2)
    inputs[:, :pairs, :cues] = onehot
    inputs[:, :pairs, cues] = rewards
    inputs[:, pairs:, :cues] = onehot
    inputs[:, pairs:, cues + 1] = 1.0
    targets = torch.cat([torch.zeros(n, pairs), rewards], 1)
    return inputs, targets


EPISODES = {"copy": copy_episodes, "regression": regression_episodes, "cue": cue_episodes}


# ---- the model --------------------------------------------------------------------------------------------------


def rule_config(rule: str) -> PlasticityConfig:
    """Chaudhary's rule in this project's terms (``hebbian`` also for ``none``, which never writes)."""
    return PlasticityConfig(
        form="gradient" if rule == "gradient" else "hebbian",
        target="output",
        modulation="gate",
        eta_max=0.2,
        norm="delta",
        inner="internal",
        alpha=True,
        chunk_size=1,
        layers=(0, 1),
        init_rate=0.02,
        init_decay=1.0,
        learn_decay=False,
    )


def torch_default_init(lm: nn.Module) -> None:
    """Their modules' initialisation instead of GPT-2's (normal, std 0.02): torch's nn.Linear default
    (``U(+-1/sqrt(fan_in))`` for weight and bias) for the MLP, the attention's output and the head, and
    ``nn.MultiheadAttention``'s for the q/k/v projection (Xavier-uniform weight, zero bias)."""
    with torch.no_grad():
        for name, module in lm.named_modules():
            if isinstance(module, transformers.pytorch_utils.Conv1D):  # weight [in, out]
                if name.endswith("attn.c_attn"):
                    nn.init.xavier_uniform_(module.weight)
                    module.bias.zero_()
                    continue
                bound = 1 / math.sqrt(module.weight.shape[0])
                module.weight.uniform_(-bound, bound)
                module.bias.uniform_(-bound, bound)
        head = lm.get_output_embeddings().weight  # [out, in]
        bound = 1 / math.sqrt(head.shape[1])
        head.uniform_(-bound, bound)


class SeedModel(nn.Module):
    """Input projection -> 2-layer GPT-2 block stack (no positions) -> head, with the rule's plastic layers."""

    def __init__(self, task: Task, rule: str, d_model: int = 128, heads: int = 4, ffn: int = 256) -> None:
        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=task.outputs,
            n_positions=64,
            n_embd=d_model,
            n_layer=2,
            n_head=heads,
            n_inner=ffn,
            activation_function="gelu",
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            tie_word_embeddings=False,
            attn_implementation="eager",
            bos_token_id=0,
            eos_token_id=0,
        )
        lm = transformers.GPT2LMHeadModel(config)
        torch_default_init(lm)
        with torch.no_grad():  # no positional encoding, as theirs
            lm.transformer.wpe.weight.zero_()
        lm.transformer.wpe.weight.requires_grad_(False)
        self.rule_name = rule
        self.input_proj = nn.Linear(task.inputs, d_model)
        plasticity = rule_config(rule)
        self.plm = PlasticLM(lm, RuleParams(plasticity, down_shapes(lm, plasticity.layers), vocab=task.outputs))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        out = self.plm(None, embeds=self.input_proj(x), adapt=self.rule_name != "none")
        return out.logits, out.S


def step_losses(task: Task, out: Tensor, targets: Tensor) -> Tensor:
    """Per-step losses `[B, T]`: cross-entropy (copy) or squared error."""
    if task.name == "copy":
        return F.cross_entropy(out.transpose(1, 2), targets, reduction="none")
    return (out[..., 0] - targets).pow(2)


def evaluate(model: SeedModel, task: Task, inputs: Tensor, targets: Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out, S = model(inputs)
    losses = step_losses(task, out, targets)
    T = targets.shape[1]
    result = {"plastic_sq_norm": float(sum(s.pow(2).sum((1, 2)) for s in S.values()).mean())}
    if task.name == "copy":
        hit = (out.argmax(-1) == targets).float()
        result |= {
            "loss": float(losses.mean()),
            "recall": float(hit[:, T // 2 :].mean()),
            "recall_tokens": float(hit[:, -5:].mean()),
        }
    elif task.name == "regression":
        result |= {"val_mse": float(losses.mean()), "query_mse": float(losses[:, T // 2 :].mean())}
    else:
        result |= {"query_mse": float(losses[:, T // 2 :].mean())}
    return result


def run(task: Task, rule: str, seed: int, episodes: int, epochs: int, batch: int, evals: int, bar: tqdm | None) -> dict:
    """Train one model from scratch on fresh episodes and evaluate it on ``evals`` fresh ones after each epoch."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    model = SeedModel(task, rule)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    make = EPISODES[task.name]
    history = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for _ in range(0, episodes, batch):
            inputs, targets = make(batch, g)
            out, _ = model(inputs)
            loss = step_losses(task, out, targets).sum(1).mean()  # summed over the steps, as theirs
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            total += float(loss.detach()) * batch
            if bar is not None:
                bar.update(batch)
        inputs, targets = make(evals, g)
        metrics = evaluate(model, task, inputs, targets)
        history.append({"epoch": epoch + 1, "train_loss": total / episodes / targets.shape[1], **metrics})
    rule_state = {}
    if rule != "none":
        with torch.no_grad():
            rp = model.plm.rule
            alpha = torch.cat([rp.connection(i).flatten() for i in rp.config.layers])
            rule_state = {
                "rate": rp.summary()["rate"],
                "alpha_mean": float(alpha.mean()),
                "alpha_std": float(alpha.std()),
                "gate_b": [float(b) for b in rp.gate_b],
            }
    return {"seed": seed, "history": history, "final": history[-1], "rule": rule_state}


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (as their aggregate)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def table(results: dict, settings: dict) -> str:
    """Markdown: task, metric, rule, ours (mean ± std over seeds), theirs."""
    lines = [
        "| task | metric | rule | ours (mean ± std) | published | ours: squared norm of S |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_rule in results.items():
        task = TASKS[name]
        for metric in task.metrics:
            for rule in RULES:
                if rule not in by_rule:
                    continue
                finals = [r["final"] for r in by_rule[rule]]
                m, s = spread([f[metric] for f in finals])
                theirs = task.published[rule].get(metric)
                norm = spread([f["plastic_sq_norm"] for f in finals])[0]
                pub = "—" if theirs is None else f"{theirs:.3f}"
                lines.append(f"| {name} | {metric} | {rule} | {m:.3f} ± {s:.3f} | {pub} | {norm:.2g} |")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--task", "tasks", multiple=True, type=click.Choice(list(TASKS)), help="Task(s) to run (default all).")
@click.option("--rule", "rules", multiple=True, type=click.Choice(RULES), help="Rule(s) to run (default all three).")
@click.option("--seeds", default=3, show_default=True, help="Seeds per task and rule (0, 1, ...).")
@click.option("--epochs", type=int, default=None, help="Epochs (default: theirs per task).")
@click.option("--episodes", type=int, default=None, help="Training episodes per epoch (default: theirs per task).")
@click.option("--eval-episodes", type=int, default=None, help="Evaluation episodes (default: theirs per task).")
@click.option("--batch", default=1, show_default=True, help="Episodes per optimizer step (theirs: 1).")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write every run's history as JSON.")
def main(tasks, rules, seeds, epochs, episodes, eval_episodes, batch, threads, out) -> None:
    """Chaudhary (2025)'s copy, few-shot regression and cue-reward tasks: static vs hebbian vs gradient plasticity
    trained with adapt_runtime.train, each beside its published number (see the module docstring)."""
    torch.set_num_threads(threads)
    tasks = tasks or tuple(TASKS)
    rules = rules or RULES
    plan = []
    for name in tasks:
        task = TASKS[name]
        n, e = episodes or task.episodes, epochs or task.epochs
        plan += [(task, rule, seed, n, e) for rule in rules for seed in range(seeds)]
    results: dict = {}
    settings = {
        name: {
            "episodes": episodes or TASKS[name].episodes,
            "epochs": epochs or TASKS[name].epochs,
            "eval_episodes": eval_episodes or TASKS[name].episodes,
        }
        for name in tasks
    }
    start = time.time()
    with tqdm(total=sum(n * e for *_, n, e in plan), unit="ep", disable=os.environ.get("TQDM_DISABLE") == "1") as bar:
        for task, rule, seed, n, e in plan:
            bar.set_description(f"{task.name} {rule} seed {seed}")
            evals = settings[task.name]["eval_episodes"]
            result = run(task, rule, seed, n, e, batch, evals, bar)
            results.setdefault(task.name, {}).setdefault(rule, []).append(result)
            tqdm.write(f"{task.name} {rule} seed {seed}: {json.dumps(result['final'])}")
    minutes = (time.time() - start) / 60
    print(table(results, settings))
    for name, s in settings.items():
        print(
            f"{name}: {s['epochs']} epochs x {s['episodes']} training episodes (batch {batch}), "
            f"evaluated on {s['eval_episodes']} fresh episodes"
        )
    print(f"{minutes:.1f} min, {threads} thread(s); published: {SOURCE}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": settings, "batch": batch, "minutes": minutes, "results": results}
        Path(out).write_text(json.dumps(payload, indent=1) + "\n")
    if any(
        math.isnan(r["final"].get(m, 0.0))
        for by in results.values()
        for rs in by.values()
        for r in rs
        for m in r["final"]
    ):
        raise SystemExit("a run diverged (NaN)")


if __name__ == "__main__":
    main()
