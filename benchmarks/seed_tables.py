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
cues shown with a reward in [0, 1], then queried in the same order; metric: query MSE), ``omniglot`` (5-way 5-shot,
15 queries per class, a Conv-4 encoder trained with the decoder, d_model 256, FFN 512, weight decay 5e-4; metrics:
query accuracy and loss; the classes come from the two small background subsets, see ``seed_omniglot.py``).

``seqrep`` is Duan et al. (ICLR 2023, yuvenduan/PlasticRNNs)'s sequence reproduction (``datasets/seq.py``; length 5,
delay 20 of their ``seqreproduction_delay``; metric: MSE over the 5 test steps, their test loss; batch 64, AdamW
without weight decay), on adapt-train's from-scratch Llama (``scratch_model``, hidden 64, FFN 128) with the same
rule at their scale (rate x alpha = 1 at init) and 4 extra outputs for the internal loss (their ``extra_dim``);
their models are RNNs/LSTMs with every linear map plastic. Their numbers are plotted, not tabulated: none is given.
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
import seed_omniglot
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from tqdm import tqdm

from adapt_runtime.train import PlasticityConfig, PlasticLM, RuleParams
from adapt_runtime.train.forward import down_shapes
from adapt_runtime.train.loop import TrainConfig, scratch_model

RULES = ("none", "hebbian", "gradient")
SOURCE = "Chaudhary 2025 (arXiv 2510.21908), experiments/results/*.json of sidcraftscode/hebbian-transformer"
DUAN = (
    "Duan et al. 2023 (ICLR, 'Hebbian and Gradient-based Plasticity Enables Robust Memory and Rapid Learning in "
    "RNNs'; yuvenduan/PlasticRNNs): their test losses are plotted (analysis/plots.py), not tabulated, and the "
    "repository holds no results files: no published number is given here"
)
CHANCE = {  # the level without memory: Omniglot's 1 in 5; predicting 0 for uniform [-1, 1] values (1/3)
    ("omniglot", "accuracy"): 0.2,
    ("omniglot", "loss"): math.log(5),
    ("seqrep", "test_mse"): 1 / 3,
}
SEQ_LENGTH, SEQ_DELAY = 5, 20  # Duan et al.'s seqreproduction_delay: length 5, delays 0, 10, 20, 40, 60


@dataclass(frozen=True)
class Task:
    """One of their tasks: input and output widths, their episode counts and their published numbers, and the
    model's shape (Chaudhary's defaults)."""

    name: str
    inputs: int
    outputs: int
    episodes: int  # their dataset_size: fresh random episodes per epoch (train) and in the evaluation
    epochs: int
    metrics: tuple[str, ...]
    published: dict[str, dict[str, float]]
    source: str = SOURCE
    evals: int | None = None  # evaluation episodes when not ``episodes``
    batch: int = 1  # their episodes per optimizer step
    backbone: str = "gpt2"  # "gpt2": Chaudhary's decoder; "llama": adapt-train's from-scratch Llama
    d_model: int = 128
    ffn: int = 256
    positions: int = 64
    weight_decay: float = 1e-4
    init_rate: float = 0.02  # rate x alpha at init
    eval_chunk: int = 0  # evaluate this many episodes at a time (0: all at once)


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
    # their experiments/results/classification_omniglot_rule-*.json: 5 epochs x 100 episodes, 50 test episodes
    "omniglot": Task(
        "omniglot",
        256 + 5 + 1,  # the encoder's embedding, the one-hot label, the query flag
        5,
        100,
        5,
        ("accuracy", "loss"),
        {
            "gradient": {"accuracy": 0.201, "loss": 1.611},
            "hebbian": {"accuracy": 0.237, "loss": 1.618},
            "none": {"accuracy": 0.192, "loss": 1.611},
        },
        evals=50,
        d_model=256,
        ffn=512,
        positions=128,
        weight_decay=5e-4,
        eval_chunk=5,
    ),
    # Duan et al.'s SeqReproductionConfig: batch 64, AdamW lr 1e-3 without weight decay, clipping at 5,
    # 10,000 steps (max_batch); 1 value + 2 flags in, 1 value out (+ their extra_dim 4 outputs, read by the
    # gradient rule's internal loss alone)
    "seqrep": Task(
        "seqrep",
        3,
        1 + 4,
        64 * 10_000,
        1,
        ("test_mse",),
        {},
        source=DUAN,
        evals=500,
        batch=64,
        backbone="llama",
        d_model=64,  # adapt-train's default shape (theirs: hidden 128)
        ffn=128,
        weight_decay=0.0,
        init_rate=1.0,
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


def seqrep_episodes(n: int, g: torch.Generator, length: int = SEQ_LENGTH, delay: int = SEQ_DELAY):
    """Duan et al.'s sequence reproduction: ``(inputs [n, T, 3], targets [n, T])``, ``T = 2 length + delay``;
    ``length`` values uniform in [-1, 1] shown with flag 1 (``(x, 1, 0)``), ``delay`` blank steps, then ``length``
    steps with the test flag (``(0, 0, 1)``) whose targets are the values in order (0 elsewhere, unscored)."""
    seq = torch.rand(n, length, generator=g) * 2 - 1
    T = 2 * length + delay
    inputs = torch.zeros(n, T, 3)
    inputs[:, :length, 0] = seq
    inputs[:, :length, 1] = 1.0
    inputs[:, length + delay :, 2] = 1.0
    targets = torch.zeros(n, T)
    targets[:, length + delay :] = seq
    return inputs, targets


EPISODES = {"copy": copy_episodes, "regression": regression_episodes, "cue": cue_episodes, "seqrep": seqrep_episodes}


def episode_maker(task: Task, omniglot_dir: str, image_size: int, shuffle_queries: bool = False):
    """``make(n, g, split)`` for ``task`` (``split`` "train" or "test" matters for Omniglot alone)."""
    if task.name == "omniglot":
        return lambda n, g, split: seed_omniglot.episodes(
            n, g, split, omniglot_dir, image_size, shuffle_queries=shuffle_queries
        )
    make = EPISODES[task.name]
    return lambda n, g, split: make(n, g)


# ---- the model --------------------------------------------------------------------------------------------------


def rule_config(rule: str, init_rate: float = 0.02) -> PlasticityConfig:
    """Chaudhary's rule in this project's terms (``hebbian`` also for ``none``, which never writes); Duan et al.'s
    is the same rule with their ``p_lr`` = ``p_wd`` = 0.1 times ``2 sigmoid(.)`` (``eta_max`` 0.2, the forgetting
    coupled to it), their clip ``inner_grad_clip`` 1 (``norm="delta"``) and per-connection rates (init 1 here)."""
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
        init_rate=init_rate,
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


def llama_backbone(task: Task, heads: int) -> nn.Module:
    """adapt-train's from-scratch Llama (``adapt_runtime.train.loop.scratch_model``: RoPE, RMSNorm, SwiGLU, tied
    head, HF's init) of 2 layers, ``task.d_model`` wide, FFN ``task.ffn``, one output per ``task.outputs``."""
    cfg = TrainConfig(data="-", out="-", n_layers=2, hidden=task.d_model, heads=heads, ffn=task.ffn)
    return scratch_model(cfg, task.outputs, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None})


class SeedModel(nn.Module):
    """Input projection -> 2-layer GPT-2 block stack (no positions) -> head, with the rule's plastic layers (or, for
    ``task.backbone`` "llama", adapt-train's Llama); for Omniglot a Conv-4 encoder embeds each step's image first."""

    def __init__(self, task: Task, rule: str, heads: int = 4, image_size: int = 84) -> None:
        super().__init__()
        self.rule_name = rule
        if task.backbone == "llama":
            lm = llama_backbone(task, heads)
            self.input_proj = nn.Linear(task.inputs, task.d_model)
            plasticity = rule_config(rule, task.init_rate)
            self.plm = PlasticLM(lm, RuleParams(plasticity, down_shapes(lm, plasticity.layers), vocab=task.outputs))
            self.encoder = None
            return
        d_model, ffn = task.d_model, task.ffn
        config = transformers.GPT2Config(
            vocab_size=task.outputs,
            n_positions=task.positions,
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
        self.input_proj = nn.Linear(task.inputs, d_model)
        plasticity = rule_config(rule, task.init_rate)
        self.plm = PlasticLM(lm, RuleParams(plasticity, down_shapes(lm, plasticity.layers), vocab=task.outputs))
        self.encoder = seed_omniglot.Conv4(image_size) if task.name == "omniglot" else None

    def forward(self, x: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
        if self.encoder is not None:  # (images [B, T, 1, H, W], tags [B, T, ways + 1])
            images, tags = x
            embedded = self.encoder(images.flatten(0, 1)).view(*tags.shape[:2], -1)
            x = torch.cat([embedded, tags], -1)
        out = self.plm(None, embeds=self.input_proj(x), adapt=self.rule_name != "none")
        return out.logits, out.S


def step_losses(task: Task, out: Tensor, targets: Tensor) -> Tensor:
    """Per-step losses `[B, T]`: cross-entropy (copy; Omniglot, 0 on the support steps) or squared error of the first
    output."""
    if task.name in ("copy", "omniglot"):
        return F.cross_entropy(out.transpose(1, 2), targets, reduction="none")  # ignore_index -100: support steps
    return (out[..., 0] - targets).pow(2)


def objective(task: Task, losses: Tensor) -> Tensor:
    """The training loss of a batch of episodes from its step losses: the sum over the episode's steps (Chaudhary's
    tasks; Omniglot: over the query steps) or, for Duan et al.'s task, the mean over the test steps; mean over the
    batch."""
    if task.name == "seqrep":
        return losses[:, SEQ_LENGTH + SEQ_DELAY :].mean()
    return losses.sum(1).mean()


def scored_steps(task: Task, targets: Tensor) -> int:
    """Steps a training loss is summed or averaged over (for the logged per-step train loss): Omniglot's queries,
    1 for the mean over seqrep's test steps, every step of the other tasks."""
    if task.name == "omniglot":
        return int((targets[0] != -100).sum())
    return 1 if task.name == "seqrep" else targets.shape[1]


def slices(x: Tensor | tuple[Tensor, ...], size: int):
    """``x`` (or each tensor of it) cut along the episodes in pieces of ``size`` (0: whole)."""
    n = (x[0] if isinstance(x, tuple) else x).shape[0]
    size = size or n
    for a in range(0, n, size):
        yield tuple(t[a : a + size] for t in x) if isinstance(x, tuple) else x[a : a + size]


def evaluate(model: SeedModel, task: Task, inputs: Tensor | tuple, targets: Tensor) -> dict[str, float]:
    model.eval()
    outs, norms = [], []
    with torch.no_grad():
        for part in slices(inputs, task.eval_chunk):
            out, S = model(part)
            outs.append(out)
            norms.append(sum(s.pow(2).sum((1, 2)) for s in S.values()))
    out = torch.cat(outs)
    losses = step_losses(task, out, targets)
    T = targets.shape[1]
    result = {"plastic_sq_norm": float(torch.cat(norms).mean())}
    if task.name == "omniglot":
        query = targets != -100
        hit = (out.argmax(-1) == targets).float()
        result |= {"accuracy": float(hit[query].mean()), "loss": float(losses[query].mean())}
    elif task.name == "seqrep":
        result |= {"test_mse": float(losses[:, SEQ_LENGTH + SEQ_DELAY :].mean())}
    elif task.name == "copy":
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


def run(
    task: Task,
    rule: str,
    seed: int,
    episodes: int,
    epochs: int,
    batch: int,
    evals: int,
    bar: tqdm | None,
    make=None,
    image_size: int = 84,
) -> dict:
    """Train one model from scratch on fresh episodes and evaluate it on ``evals`` fresh ones after each epoch
    (Omniglot: from the test classes)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    model = SeedModel(task, rule, image_size=image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=task.weight_decay)
    make = make or episode_maker(task, str(seed_omniglot.DEFAULT_DIR), image_size)
    history = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for _ in range(0, episodes, batch):
            inputs, targets = make(batch, g, "train")
            out, _ = model(inputs)
            loss = objective(task, step_losses(task, out, targets))  # summed over the steps, as theirs
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            total += float(loss.detach()) * batch
            if bar is not None:
                bar.update(batch)
        inputs, targets = make(evals, g, "test")
        metrics = evaluate(model, task, inputs, targets)
        per_step = total / episodes / scored_steps(task, targets)
        history.append({"epoch": epoch + 1, "train_loss": per_step, **metrics})
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
        "| task | metric | rule | ours (mean ± std) | published | ours: squared norm of S | chance |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_rule in results.items():
        task = TASKS[name]
        for metric in task.metrics:
            for rule in RULES:
                if rule not in by_rule:
                    continue
                finals = [r["final"] for r in by_rule[rule]]
                m, s = spread([f[metric] for f in finals])
                theirs = task.published.get(rule, {}).get(metric)
                norm = spread([f["plastic_sq_norm"] for f in finals])[0]
                pub = "—" if theirs is None else f"{theirs:.3f}"
                level = CHANCE.get((name, metric))
                chance = "—" if level is None else f"{level:.3f}"
                lines.append(f"| {name} | {metric} | {rule} | {m:.3f} ± {s:.3f} | {pub} | {norm:.2g} | {chance} |")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--task", "tasks", multiple=True, type=click.Choice(list(TASKS)), help="Task(s) to run (default all).")
@click.option("--rule", "rules", multiple=True, type=click.Choice(RULES), help="Rule(s) to run (default all three).")
@click.option("--seeds", default=3, show_default=True, help="Seeds per task and rule (0, 1, ...).")
@click.option("--epochs", type=int, default=None, help="Epochs (default: theirs per task).")
@click.option("--episodes", type=int, default=None, help="Training episodes per epoch (default: theirs per task).")
@click.option("--eval-episodes", type=int, default=None, help="Evaluation episodes (default: theirs per task).")
@click.option("--batch", type=int, default=None, help="Episodes per optimizer step (default: theirs, 1; seqrep 64).")
@click.option(
    "--omniglot-dir",
    type=click.Path(file_okay=False),
    default=str(seed_omniglot.DEFAULT_DIR),
    show_default="shared/data/omniglot beside the repository",
    help="Folder with images_background_small1.zip and images_background_small2.zip.",
)
@click.option("--image-size", default=84, show_default=True, help="Omniglot images resized to this (theirs: 84).")
@click.option(
    "--shuffle-queries",
    is_flag=True,
    help="Omniglot: queries in a random order (theirs: grouped by class, which a model can read the labels from).",
)
@click.option("--threads", default=1, show_default=True, help="torch threads.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write every run's history as JSON.")
def main(
    tasks, rules, seeds, epochs, episodes, eval_episodes, batch, omniglot_dir, image_size, shuffle_queries, threads, out
) -> None:
    """Static vs hebbian vs gradient plasticity, trained with adapt_runtime.train, beside the published numbers.

    \b
    Chaudhary (2025)'s tasks, its transformer (see the module docstring):
      copy        copy 5 of 8 symbols after a delay of 20 (loss, recall)
      regression  few-shot linear regression, 10 support + 10 query pairs (MSE)
      cue         8 cue-reward pairs, then the cues queried (MSE)
      omniglot    5-way 5-shot Omniglot, 15 queries per class, Conv-4 encoder (query accuracy, loss); train
                  classes: images_background_small1's 5 alphabets; test classes: the 3 alphabets of
                  images_background_small2 that small1 lacks (characters never seen in training)
    Duan et al. (ICLR 2023)'s task, on adapt-train's from-scratch Llama (theirs: plastic RNNs):
      seqrep      sequence reproduction: 5 values in [-1, 1], a delay of 20, then the 5 values (test MSE)
    """
    torch.set_num_threads(threads)
    tasks = tasks or tuple(TASKS)
    rules = rules or RULES
    plan = []
    for name in tasks:
        task = TASKS[name]
        n, e = episodes or task.episodes, epochs or task.epochs
        plan += [(task, rule, seed, n, e) for seed in range(seeds) for rule in rules]  # paired runs first
    results: dict = {}
    settings = {
        name: {
            "episodes": episodes or TASKS[name].episodes,
            "epochs": epochs or TASKS[name].epochs,
            "eval_episodes": eval_episodes or TASKS[name].evals or TASKS[name].episodes,
            "batch": batch or TASKS[name].batch,
        }
        for name in tasks
    }
    if "omniglot" in tasks:
        settings["omniglot"] |= {
            "image_size": image_size,
            "shuffle_queries": shuffle_queries,
            "classes": seed_omniglot.split_summary(omniglot_dir, image_size),
        }
    start, cpu_start = time.time(), time.process_time()
    with tqdm(total=sum(n * e for *_, n, e in plan), unit="ep", disable=os.environ.get("TQDM_DISABLE") == "1") as bar:
        for task, rule, seed, n, e in plan:
            bar.set_description(f"{task.name} {rule} seed {seed}")
            evals = settings[task.name]["eval_episodes"]
            make = episode_maker(task, omniglot_dir, image_size, shuffle_queries)
            wall, cpu = time.time(), time.process_time()
            result = run(task, rule, seed, n, e, settings[task.name]["batch"], evals, bar, make, image_size)
            result |= {"wall_s": time.time() - wall, "cpu_s": time.process_time() - cpu}
            results.setdefault(task.name, {}).setdefault(rule, []).append(result)
            tqdm.write(f"{task.name} {rule} seed {seed}: {json.dumps(result['final'])}")
    minutes, cpu_minutes = (time.time() - start) / 60, (time.process_time() - cpu_start) / 60
    print(table(results, settings))
    for name, s in settings.items():
        print(
            f"{name}: {s['epochs']} epochs x {s['episodes']} training episodes (batch {s['batch']}), "
            f"evaluated on {s['eval_episodes']} fresh episodes"
            + (f", images {image_size} x {image_size}, classes {s['classes']}" if name == "omniglot" else "")
        )
    print(f"{minutes:.1f} min wall, {cpu_minutes:.1f} min CPU, {threads} thread(s)")
    for source in dict.fromkeys(TASKS[name].source for name in tasks):
        print(f"published: {source}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": settings, "minutes": minutes, "cpu_minutes": cpu_minutes, "results": results}
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
