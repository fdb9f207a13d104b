"""``load_model``: aliases, the bundled default model, HF hub ids and local directories."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from adapt_runtime.errors import ModelNotFoundError

BUNDLED = "stories260K"

ALIASES: dict[str, str] = {
    "llama": BUNDLED,
    "stories260k": BUNDLED,
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "pythia-70m": "EleutherAI/pythia-70m",
    "gpt2": "openai-community/gpt2",
}


def bundled_model_dir() -> Path:
    """Directory of the bundled stories260K model (package data, with its PROVENANCE.md)."""
    return Path(str(resources.files("adapt_runtime") / "data" / BUNDLED))


def resolve_model_name(name: str) -> str:
    """Map an alias to a local directory or a hub id; other names pass through unchanged."""
    target = ALIASES.get(name.lower(), name)
    return str(bundled_model_dir()) if target == BUNDLED else target


def _attn_implementation(device: torch.device) -> str | None:
    """``flash_attention_2`` on CUDA with flash-attn installed; otherwise None, which lets transformers pick
    ``sdpa`` wherever the architecture supports it (and eager where it does not)."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return None
        return "flash_attention_2"
    return None


def load_model(name: str = "llama", dtype: str | torch.dtype | None = None, device: str | None = None):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: an alias (``llama`` is the bundled stories260K; see ``ALIASES``), a local directory, or a HF hub id
            (from the local cache, or downloaded when online).
        dtype: ``float32``, ``bfloat16``, ``float16`` or a torch dtype; default: the checkpoint's own.
        device: ``cpu``, ``cuda``, ``cuda:1``...; default ``cpu``.

    Returns:
        ``(model, tokenizer)``.

    Example:
        >>> model, tokenizer = load_model("llama")
    """
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_model_name(name)
    dev = torch.device(device or "cpu")
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    local = Path(target).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelNotFoundError(f"{local} exists but holds no config.json; point at a HF model directory")
    source = str(local) if local.exists() else target
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    kwargs = {}
    attn = _attn_implementation(dev)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, HFValidationError) as err:  # older hubs reject a missing path as a malformed repo id
        hint = "it is not cached and the hub cannot be reached" if offline or not local.exists() else str(err)
        aliases = ", ".join(sorted(ALIASES))
        raise ModelNotFoundError(
            f"cannot load model {name!r} ({hint}). Use a local model directory, run once online to cache "
            f"{target!r}, or use a bundled alias ({aliases}; 'llama' works offline)."
        ) from None
    return model.to(dev).eval(), tokenizer
