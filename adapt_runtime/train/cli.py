"""``adapt-train``: train a model with plastic layers in the loop (see ``adapt-train --help``)."""

from __future__ import annotations

import sys

import click

from adapt_runtime.train.config import FORMS, MODULATIONS, NORMS, TARGETS

HELP = """Train a model with its fast weights in the loop, and learn the plasticity rule.

\b
Every stream of --seq-len tokens is read as the runtime reads it: chunks of --chunk-size tokens, each computed
with the current fast weights S, then S <- lambda * S + U (the rule's write); windows of --window tokens with the
KV cache dropped between them, so S is the only path from one window to the next. The loss is the next-token
cross-entropy of every position, with gradients through the writes across chunks and windows (backprop through S).

\b
Learned: per plastic layer a rate and a decay (kept in range by softplus / sigmoid), per-connection coefficients
alpha (--alpha), a neuromodulation gate (--modulation gate, which also sets the forgetting as in Chaudhary 2025:
W <- (1 - eta) W + eta alpha . Delta); with --learn all the model's own weights too.

\b
Without --model, a Llama of --n-layers x --hidden (--heads, --ffn) is trained from scratch with the --tokenizer's
vocabulary; --model llama continues the bundled stories260K. The tail --holdout of --data is held out (--eval-every
reports its NLL with and without the rule). Checkpoints OUT/step-N hold the model, the rule, the optimizer, the
step and the RNG states; --resume continues from the newest. Serve one with
adapt-serve --model OUT/step-N --rule learned, or load it with ar.load_model(DIR) + ar.patch(model, rule="learned").

\b
Example (2-layer Llama from scratch, hebbian rule with a learned gate, on TinyStories):
  adapt-train --data ../shared/data/tinystories/tinystories_val.txt --out runs/hebb --modulation gate \\
      --chunk-size 16 --seq-len 256 --window 64 --steps 200
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="Text file to train on (UTF-8).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder of the checkpoints.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the newest checkpoint in --out, with its saved "
    "settings (--steps may raise the total; other flags are ignored).",
)
@click.option(
    "--model",
    default=None,
    help="Pretrained model to continue ('llama': the bundled stories260K, or a "
    "local HF folder); default: a Llama from scratch.",
)
@click.option("--tokenizer", default="llama", show_default=True, help="Tokenizer of a from-scratch model.")
@click.option("--n-layers", default=2, show_default=True, help="From scratch: decoder layers.")
@click.option("--hidden", default=64, show_default=True, help="From scratch: model width.")
@click.option("--heads", default=4, show_default=True, help="From scratch: attention heads.")
@click.option("--kv-heads", default=None, type=int, help="From scratch: KV heads (default: --heads).")
@click.option("--ffn", default=128, show_default=True, help="From scratch: MLP width (the down projection's input).")
@click.option(
    "--form",
    type=click.Choice(FORMS),
    default="hebbian",
    show_default=True,
    help="The write: hebbian (target x key), delta (target less what S retrieves) or gradient "
    "(-dL/dy of the chunk's next-token loss, differentiated with create_graph).",
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="error",
    show_default=True,
    help="hebbian/delta target: the prediction error U^T(onehot - p), the layer's output, or the next "
    "token's embedding.",
)
@click.option(
    "--modulation",
    type=click.Choice(MODULATIONS),
    default="none",
    show_default=True,
    help="Per-token factor of the write: none, surprise (NLL / mean NLL) or a learned gate.",
)
@click.option("--alpha", is_flag=True, help="Learn per-connection coefficients alpha [d, f] per layer.")
@click.option("--eta-max", default=0.2, show_default=True, help="Ceiling of the learned gate.")
@click.option(
    "--norm",
    type=click.Choice(NORMS),
    default="key",
    show_default=True,
    help="The rate's divisor: key (n mean ||x||^2 of the chunk) or delta (Chaudhary's min(1, 1/||Delta_t||)).",
)
@click.option("--chunk-size", default=32, show_default=True, help="Tokens per chunk (write every chunk).")
@click.option("--layers", default="all", show_default=True, help="Plastic layers: all, last:N, every:K or indices.")
@click.option("--init-rate", default=1.0, show_default=True, help="Initial per-layer rate.")
@click.option("--init-decay", default=0.99, show_default=True, help="Initial per-layer decay of S per chunk.")
@click.option("--fixed-decay", is_flag=True, help="Keep the decay at --init-decay (1.0 allowed) instead of learning.")
@click.option(
    "--learn",
    type=click.Choice(["rule", "all"]),
    default="rule",
    show_default=True,
    help="rule: the rule's parameters only (the model frozen); all: the model's weights too.",
)
@click.option("--steps", default=None, type=int, help="Optimizer steps in all (default 100).")
@click.option("--batch", default=8, show_default=True, help="Streams per step.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per stream.")
@click.option("--window", default=128, show_default=True, help="Context window; the KV is dropped between windows.")
@click.option("--lr", default=1e-3, show_default=True, help="AdamW learning rate of the model's weights.")
@click.option("--rule-lr", default=1e-2, show_default=True, help="AdamW learning rate of the rule's parameters.")
@click.option("--grad-clip", default=1.0, show_default=True, help="Gradient norm clip (0: none).")
@click.option("--holdout", default=0.05, show_default=True, help="Tail fraction of --data held out.")
@click.option("--eval-every", default=0, show_default=True, help="Report held-out NLL every N steps (0: never).")
@click.option("--eval-streams", default=8, show_default=True, help="Held-out streams per evaluation.")
@click.option("--save-every", default=0, show_default=True, help="Checkpoint every N steps (and always at the end).")
@click.option("--keep", default=2, show_default=True, help="Checkpoints to keep.")
@click.option("--seed", default=0, show_default=True, help="Seed of the initialisation and the data sampling.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def main(
    data: str | None, out: str, resume: bool, steps: int | None, no_progress: bool, fixed_decay: bool, **flags
) -> None:
    from adapt_runtime.train.loop import TrainConfig, resume_config, train

    try:
        if resume:
            cfg = resume_config(out, steps=steps)
        else:
            if data is None:
                raise click.UsageError("--data is required (or --resume)")
            cfg = TrainConfig(data=data, out=out, steps=steps or 100, learn_decay=not fixed_decay, **flags)
        train(cfg, resume=resume, progress=not no_progress, log=lambda line: click.echo(line, err=True))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        click.echo(f"adapt-train: error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
