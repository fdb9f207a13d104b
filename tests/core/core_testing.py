"""Tiny models built from configs (no downloads), token streams and patched runtimes for the core tests, the
device they run on and the one tolerance table of the core tests.

``ADAPT_TEST_DEVICE=cuda`` (or ``cuda:1``) runs the runtime on that device: models and token streams are made
there; without the device the tests skip (see ``conftest.py``).
"""

from __future__ import annotations

import os

import torch
import transformers

import adapt_runtime as ar

VOCAB = 97
DEVICE = torch.device(os.environ.get("ADAPT_TEST_DEVICE") or "cpu")

# (atol, rtol) per kind of comparison; every core test takes its tolerance from here. On a GPU the kernels
# (sdpa, cuBLAS) reassociate more, so each bound is ten times looser there.
TOLERANCES: dict[str, tuple[float, float]] = {
    "same-call": (1e-6, 1e-6),  # the same tokens in calls of different lengths (matmul blocking only)
    "prefix": (1e-5, 1e-5),  # positions before a change of the stream (causality)
    "logits": (1e-4, 1e-4),  # logits of a stream fed in pieces, token by token, batched or alone
    "state": (1e-5, 1e-4),  # S after the same stream fed differently
    "reference": (1e-5, 1e-4),  # a rule's write against an independent re-implementation
    "autograd": (1e-6, 1e-4),  # the gradient write against autograd w.r.t. S (small S, tight atol)
    "definition": (1e-5, 1e-5),  # a formula against its definition on the same inputs
    "bfloat16-state": (1e-5, 2**-7),  # a bfloat16 S after the same stream fed differently: one rounding step
}
_LOOSEN = 10.0 if DEVICE.type == "cuda" else 1.0


def tolerance(kind: str) -> dict[str, float]:
    """``atol``/``rtol`` keyword arguments of ``kind`` (a key of ``TOLERANCES``) on this device."""
    atol, rtol = TOLERANCES[kind]
    return {"atol": atol * _LOOSEN, "rtol": rtol * _LOOSEN}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``kind``."""
    torch.testing.assert_close(actual, expected, **tolerance(kind))

TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                      num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8)),
    "gemma2": ("Gemma2Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, sliding_window=256)),
    "gemma3_text": ("Gemma3TextConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=8, sliding_window=256)),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_head=4, n_inner=48, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=48, num_attention_heads=4, word_embed_proj_dim=32)),
}


def tiny_model(arch: str = "llama", layers: int = 3, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-init float32 causal LM of ``arch`` in eval mode on the test device (transformers picks sdpa where
    supported); ``overrides`` change config fields, e.g. ``sliding_window=8``."""
    name, kwargs = TINY_CONFIGS[arch]
    config = getattr(transformers, name)(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=256,
                                         **{**kwargs, **overrides})
    if arch == "gpt2":
        config.n_layer = layers
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval().to(DEVICE)


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random ids (never the special ids 0-2) on the test device."""
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# Rates large enough that writes visibly move the tiny random model (the defaults are for real models).
RULE_KWARGS = {
    "none": {},
    "hebbian": {"lr": 4.0},
    "hebbian-output": {"lr": 1.0, "target": "output", "modulation": "surprise"},
    "gradient": {"lr": 2.0},
}


def patched(rule: str, chunk_size: int = 7, arch: str = "llama", **kwargs) -> ar.Runtime:
    name = "hebbian" if rule.startswith("hebbian") else rule
    options = {**RULE_KWARGS[rule], **kwargs}
    return ar.patch(tiny_model(arch), rule=name, chunk_size=chunk_size, **options)
