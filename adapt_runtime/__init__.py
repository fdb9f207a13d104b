"""adapt-runtime: plastic down_proj fast weights for pretrained decoder LLMs.

    import adapt_runtime as ar
    model, tokenizer = ar.load_model("llama")
    rt = ar.patch(model, rule="hebbian")
    state = rt.new_state()
    logits = rt.forward(input_ids, state)          # adapts causally as it reads
"""

from adapt_runtime.config import RuntimeConfig, select_layers
from adapt_runtime.errors import (
    AdaptRuntimeError,
    AlreadyPatchedError,
    ContextOverflowError,
    IncompatibleStateError,
    MalformedStateError,
    ModelNotFoundError,
    StateFileError,
    UnsupportedArchitectureError,
)
from adapt_runtime.lora import LoraAdapterError, LoraFormatError, LoraIncompatibleError, export_lora, import_lora
from adapt_runtime.models import ALIASES, bundled_model_dir, load_model
from adapt_runtime.patch import patch
from adapt_runtime.rules import RULES, Rule, make_rule
from adapt_runtime.runtime import Runtime
from adapt_runtime.sampling import sample
from adapt_runtime.state import FastWeights
from adapt_runtime.state_file import load_state, state_from_bytes

__version__ = "0.1.0"

__all__ = [
    "ALIASES", "RULES", "AdaptRuntimeError", "AlreadyPatchedError", "ContextOverflowError", "FastWeights",
    "ModelNotFoundError", "Rule", "Runtime", "RuntimeConfig", "StateFileError", "UnsupportedArchitectureError",
    "bundled_model_dir", "load_model", "load_state", "make_rule", "patch", "sample", "select_layers",
    "state_from_bytes", "IncompatibleStateError", "MalformedStateError", "LoraAdapterError", "LoraFormatError",
    "LoraIncompatibleError", "export_lora", "import_lora",
]
