"""A session's fast weights as a standard PEFT LoRA adapter on the plastic down projections, and back.

    import adapt_runtime as ar
    info = ar.export_lora(rt, state, "memory-adapter")            # exact; rank=8 for the best rank-8 adapter
    # PEFT: PeftModel.from_pretrained(unpatched_model, "memory-adapter") gives rt.forward(..., adapt=False)
    # vLLM: vllm serve <base model> --enable-lora --lora-modules memory=memory-adapter
    state = ar.import_lora(rt, "memory-adapter")                   # a fresh state with S = (alpha/r) B A

The format (module names per architecture, factor orientation) is in ``adapt_runtime.lora_format``; the
factorisation in ``adapt_runtime.lora_export``; the checks on import in ``adapt_runtime.lora_import``.
"""

from adapt_runtime.lora_export import LoraExport, export_lora, lora_files
from adapt_runtime.lora_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoraAdapterError,
    LoraFormatError,
    LoraIncompatibleError,
    module_name,
)
from adapt_runtime.lora_import import import_lora, lora_from_files

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "LoraAdapterError", "LoraExport", "LoraFormatError", "LoraIncompatibleError",
    "export_lora", "import_lora", "lora_files", "lora_from_files", "module_name",
]
