"""Tiny models built from configs (no downloads), token streams and patched runtimes for the core tests."""

from __future__ import annotations

import torch
import transformers

import adapt_runtime as ar

VOCAB = 97

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


def tiny_model(arch: str = "llama", layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A random-init float32 causal LM of ``arch`` in eval mode (transformers picks sdpa where supported)."""
    name, kwargs = TINY_CONFIGS[arch]
    config = getattr(transformers, name)(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=256,
                                         **kwargs)
    if arch == "gpt2":
        config.n_layer = layers
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


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
