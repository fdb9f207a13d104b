"""Helpers of the LoRA tests: tiny random models of every patch-table naming, a session that has read a text, and
the reference computations (PEFT's logits, the runtime's ``adapt=False`` logits on a fresh stream)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import adapt_runtime as ar

TEXT = ("Once upon a time there was a little girl named Lily. She loved to play outside in the park with her friends. "
        "One day she found a shiny red ball under a big tree, and she ran to show it to her mom. ") * 3
PROMPT = "The dog ran to the park and saw a big red ball. He was very happy"
ARCHS = ("llama", "gpt2", "opt", "gpt_neox")


def tiny_model(arch: str) -> nn.Module:
    """A random-init 2-layer causal LM of ``arch`` (``llama`` is the bundled pretrained model)."""
    if arch == "llama":
        return ar.load_model("llama")[0]
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, OPTConfig

    torch.manual_seed(0)
    configs = {
        "gpt2": GPT2Config(vocab_size=128, n_positions=256, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                           eos_token_id=0),
        "opt": OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=32),
        "gpt_neox": GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=256),
    }
    return AutoModelForCausalLM.from_config(configs[arch]).float().eval()


def token_ids(arch: str, text: str, n: int | None = None) -> list[int]:
    """The bundled tokenizer's ids for the Llama; fixed pseudo-random ids (from the text) for the tiny models."""
    if arch == "llama":
        ids = ar.load_model("llama")[1](text).input_ids
    else:
        gen = torch.Generator().manual_seed(len(text))
        ids = torch.randint(0, 128, (len(text) // 3,), generator=gen).tolist()
    return ids[:n] if n else ids


def session(arch: str, rule: str = "hebbian", layers: str | None = "all", **options):
    """``(rt, base, state)``: the patched runtime, an unpatched copy of the same model, a state that read TEXT."""
    model = tiny_model(arch)
    base = copy.deepcopy(model)
    rt = ar.patch(model, rule=rule, layers=layers, **options)
    state = rt.new_state()
    rt.forward(token_ids(arch, TEXT), state)
    assert not state.is_zero and state.writes >= 2
    return rt, base, state


def runtime_logits(rt, state, ids: list[int]) -> torch.Tensor:
    """The runtime's ``adapt=False`` logits of ``ids`` read from position 0 with ``state``'s S."""
    probe = state.clone()
    probe.drop_kv()
    return rt.forward(ids, probe, adapt=False)[0]


def peft_logits(base: nn.Module, adapter: Path, ids: list[int]) -> torch.Tensor:
    """PEFT's logits of ``ids`` with the adapter directory loaded into a copy of the unpatched model."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
