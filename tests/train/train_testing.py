"""Helpers of the training tests: tiny Llamas from configs (no downloads), learned rules with non-trivial
parameters (as if trained), token streams, and a runtime that reads a stream in windows as ``Runtime.read`` does."""

from __future__ import annotations

import types

import torch
import transformers

import adapt_runtime as ar
from adapt_runtime.train import PlasticityConfig, RuleParams
from adapt_runtime.train.forward import down_shapes

VOCAB = 61
# (form, target, modulation, alpha): every form, every target and modulation, with and without alpha
CASES = [
    ("hebbian", "error", "none", False),
    ("hebbian", "output", "gate", True),
    ("delta", "next_token", "surprise", False),
    ("gradient", "error", "gate", True),
]


def tiny_llama(
    layers: int = 2, hidden: int = 16, ffn: int = 24, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if dtype == torch.float64:  # LlamaRMSNorm computes in float32 whatever the dtype: keep float64 throughout
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(_rms_norm, module)
    return model


def _rms_norm(self, h: torch.Tensor) -> torch.Tensor:
    return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def stream(n: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    """`[rows, n]` random ids."""
    return torch.randint(3, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def learned_rule(
    model: torch.nn.Module,
    form: str,
    target: str,
    modulation: str,
    alpha: bool,
    chunk: int = 4,
    layers: tuple[int, ...] = (0, 1),
    seed: int = 1,
) -> RuleParams:
    """A rule whose every parameter is moved off its initial value (so each one matters)."""
    config = PlasticityConfig(
        form=form,
        target=target,
        modulation=modulation,
        alpha=alpha,
        chunk_size=chunk,
        layers=layers,
        init_rate=1.5,
        init_decay=0.9,
        eta_max=0.5,
    )
    params = RuleParams(config, down_shapes(model, layers))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return params.to(next(model.parameters()).dtype)


def runtime_read(rt: ar.Runtime, ids: torch.Tensor, window: int) -> tuple[torch.Tensor, ar.FastWeights]:
    """Logits `[T, V]` and the state of one row read window by window, the KV dropped before each window."""
    state = rt.new_state()
    logits = []
    for a in range(0, ids.shape[-1], window):
        state.drop_kv()
        logits.append(rt.forward(ids[a : a + window], state)[0])
    return torch.cat(logits), state


def write_text(path, words: int = 1200, seed: int = 0) -> None:
    """A text file of short repetitive sentences (tokenised by the bundled tokenizer)."""
    import random

    rng = random.Random(seed)
    names, things = ["Lily", "Tom", "Sam", "Mia"], ["ball", "cat", "tree", "cake", "boat"]
    lines, count = [], 0
    while count < words:
        line = f"{rng.choice(names)} saw a big {rng.choice(things)} and was happy with the {rng.choice(things)}."
        lines.append(line)
        count += len(line.split())
    path.write_text("\n".join(lines) + "\n")
