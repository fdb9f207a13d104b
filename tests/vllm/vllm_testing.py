"""Shared by the vLLM checks: a random-init Llama that vLLM's CPU build runs (head_dim 64: its CPU attention does
not take the bundled model's head_dim 8), with the bundled tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

import adapt_runtime as ar


def make_model(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.05)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        shutil.copy(ar.bundled_model_dir() / name, folder / name)
