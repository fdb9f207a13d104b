"""The patch table: where each supported architecture keeps its decoder layers and its down projection."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adapt_runtime.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Paths, relative to the CausalLM module, of the parts the runtime touches.

    Attributes:
        layers: attribute path of the decoder layer list.
        down: path, inside a layer, of the down projection (the plastic module).
        mlp_in: path, inside a layer, of the module whose input is the MLP input ``h`` (In-Place TTT's target).
        final_norm: path, from the CausalLM, of the norm before the unembedding.
        conv1d: True when the down projection is a GPT-2 ``Conv1D`` (weight stored ``[f, d]``).
    """

    layers: str
    down: str
    mlp_in: str
    final_norm: str = "model.norm"
    conv1d: bool = False


_LLAMA_LIKE = ArchSpec(layers="model.layers", down="mlp.down_proj", mlp_in="mlp")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": ArchSpec(layers="transformer.h", down="mlp.c_proj", mlp_in="mlp", final_norm="transformer.ln_f",
                     conv1d=True),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", down="mlp.dense_4h_to_h", mlp_in="mlp",
                         final_norm="gpt_neox.final_layer_norm"),
    "opt": ArchSpec(layers="model.decoder.layers", down="fc2", mlp_in="fc1",
                    final_norm="model.decoder.final_layer_norm"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The table entry for ``model``'s ``config.model_type``, or an error listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def get_path(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)
