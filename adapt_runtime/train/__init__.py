"""Training with plasticity in the loop: the runtime's chunked apply-then-write with gradients through the writes.

config.py      PlasticityConfig: the learned rule's form, target, modulation, chunk size, layers
params.py      RuleParams: the learned per-layer rate and decay, alpha, gate (an nn.Module)
update.py      a chunk's write as tensors: shared by training and the runtime's ``learned`` rule
hooks.py       FastWeightHooks: S applied to an unmodified HF model, with autograd
forward.py     PlasticLM: the differentiable chunked forward (windows, KV dropped between them)
data.py, checkpoint.py, loop.py, cli.py: ``adapt-train``
"""

from __future__ import annotations

from typing import Any

from adapt_runtime.train.config import PlasticityConfig
from adapt_runtime.train.params import RuleParams

__all__ = ["PlasticLM", "PlasticOutput", "PlasticityConfig", "RuleParams"]


def __getattr__(name: str) -> Any:  # the forward imports the runtime, which imports the rules: load it on use
    if name in ("PlasticLM", "PlasticOutput"):
        from adapt_runtime.train import forward

        return getattr(forward, name)
    raise AttributeError(name)
