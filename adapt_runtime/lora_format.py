"""The PEFT LoRA adapter format as the runtime writes and reads it: file names, module names, errors.

A session's fast weight S of a plastic layer is a `[d_out, d_in]` delta on that layer's down projection, the same
orientation as PEFT's ``lora_B.weight @ lora_A.weight`` (``lora_A`` is `[r, d_in]`, ``lora_B`` is `[d_out, r]`;
PEFT applies them to the module's input: ``y = W0 x + (alpha / r) B A x``). GPT-2's ``Conv1D`` stores W0
transposed, not its LoRA factors, so its adapters use the same orientation (with ``fan_in_fan_out`` set).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from adapt_runtime.errors import AdaptRuntimeError

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
FACTORS = ("lora_A.weight", "lora_B.weight")
METADATA_KEY = "adapt_runtime"  # safetensors header metadata: W0 hashes, ranks, per-layer errors (JSON)
_W0_HASHES: WeakKeyDictionary = WeakKeyDictionary()


class LoraAdapterError(AdaptRuntimeError, ValueError):
    """An adapter that cannot be imported into this runtime."""


class LoraFormatError(LoraAdapterError):
    """The files are not a well-formed PEFT LoRA adapter (missing files, bad JSON or safetensors, bad shapes)."""


class LoraIncompatibleError(LoraAdapterError):
    """A well-formed adapter made for something else: another base model, modules other than the runtime's plastic
    down projections, other layers, or PEFT options the runtime cannot represent (DoRA, LoRA bias, ...)."""


def module_name(rt: Runtime, layer: int) -> str:
    """The down projection of ``layer`` as PEFT names it, relative to the CausalLM (``model.layers.3.mlp.down_proj``,
    ``transformer.h.3.mlp.c_proj``, ``model.decoder.layers.3.fc2``, ``gpt_neox.layers.3.mlp.dense_4h_to_h``)."""
    return f"{rt.arch.layers}.{layer}.{rt.arch.down}"


def plastic_modules(rt: Runtime) -> dict[str, int]:
    """PEFT module name -> layer index, for every plastic layer of ``rt``."""
    return {module_name(rt, layer): layer for layer in rt.config.layers}


def weight_key(module: str, factor: str) -> str:
    return f"{KEY_PREFIX}{module}.{factor}"


def base_model_name(rt: Runtime) -> str | None:
    """What PEFT writes as ``base_model_name_or_path``: the name or directory the model was loaded from."""
    name = getattr(rt.model, "name_or_path", None) or getattr(rt.model.config, "_name_or_path", None)
    return str(name) if name else None


def same_base_name(a: str | None, b: str | None) -> bool:
    """Loose comparison of two ``base_model_name_or_path`` values: a hub id, a local directory or a cache path
    name the same model when one's last component appears in the other (``stories260K`` and ``/x/stories260K``;
    ``meta-llama/Llama-3.2-1B`` and ``.../models--meta-llama--Llama-3.2-1B/...``). Unknown names match."""
    if not a or not b:
        return True
    tail_a = a.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    tail_b = b.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    return tail_a == tail_b or (bool(tail_a) and tail_a in b.lower()) or (bool(tail_b) and tail_b in a.lower())


def layer_fingerprints(rt: Runtime) -> dict[int, str]:
    """Per plastic layer, the sha256 of its W0 (the state fingerprint's hash, one layer at a time), so that an
    adapter made on some layers of a model is recognised by a runtime that patches other layers of it."""
    cached = _W0_HASHES.get(rt)
    if cached is None:
        from adapt_runtime.patch import fingerprint

        cached = {layer: fingerprint([rt.plastic[layer].weight0]) for layer in rt.config.layers}
        _W0_HASHES[rt] = cached
    return cached
