"""``patch``: wrap the down projections of the selected layers into plastic modules and return a ``Runtime``."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from adapt_runtime.architectures import arch_spec, get_path, set_path
from adapt_runtime.chunk import FINAL_SCALE
from adapt_runtime.config import RuntimeConfig, select_layers
from adapt_runtime.errors import AlreadyPatchedError
from adapt_runtime.plastic import PlasticDown, Tap, final_scale, hidden
from adapt_runtime.rules import RULES, InPlaceTTTRule, Rule, make_rule, rule_class
from adapt_runtime.rules.steps import with_defaults
from adapt_runtime.runtime import Runtime


def fingerprint(weights: list[torch.Tensor]) -> str:
    """sha256 over the bytes of the plastic layers' W0, in layer order."""
    digest = hashlib.sha256()
    for w in weights:
        digest.update(str(tuple(w.shape)).encode())
        digest.update(w.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _defaults(rule: Rule, chunk_size, layers, lr, decay, clip, norm_bound, default_bound) -> dict[str, Any]:
    if isinstance(rule, InPlaceTTTRule):
        chunk_size = chunk_size if chunk_size is not None else rule.ttt_chunk
        layers = layers if layers is not None else rule.ttt_layers
        lr = lr if lr is not None else rule.ttt_lr
    return {
        "chunk_size": int(chunk_size if chunk_size is not None else rule.default_chunk_size),
        "layers": layers if layers is not None else rule.default_layers,
        "lr": float(lr if lr is not None else rule.default_lr),
        "decay": float(decay if decay is not None else rule.default_decay),
        "clip": clip if clip is not None else rule.default_clip,
        "norm_bound": (norm_bound or None) if norm_bound is not None else default_bound,  # 0: no bound
    }


def patch(model: nn.Module, rule: str | Rule = "hebbian", chunk_size: int | None = None,
          layers: str | list[int] | None = None, lr: float | None = None, decay: float | None = None,
          clip: float | None = None, state_dtype: str = "float32", norm_bound: float | None = None,
          state_rank: int | None = None, **rule_options: Any) -> Runtime:
    """Make the down projections of ``layers`` plastic and return the ``Runtime`` that drives them.

    Args:
        model: a HF causal LM of a supported architecture (see ``adapt_runtime.architectures``).
        rule: ``hebbian``, ``gradient``, ``inplace-ttt``, ``none``, or a ``Rule`` object.
        chunk_size, layers, lr, decay, clip, norm_bound: see ``RuntimeConfig``; None takes the rule's measured
            default (``norm_bound=0`` turns the bound off).
        state_dtype: dtype of the fast weights (``float32`` default).
        state_rank: keep each layer's S as rank-r factors (``adapt_runtime.lowrank``); None (default): dense S.
        **rule_options: options of the named rule, e.g. ``target="error"`` for ``hebbian``.

    Example:
        >>> model, tokenizer = load_model("llama")
        >>> rt = patch(model, rule="gradient")
        >>> state = rt.new_state()
        >>> logits = rt.forward(tokenizer("Once upon a time", return_tensors="pt").input_ids, state)
    """
    spec = arch_spec(model)
    if any(isinstance(m, PlasticDown) for m in model.modules()):
        raise AlreadyPatchedError("this model is already patched; call rt.unpatch() first")
    reads_folder = rule == "inplace-ttt" or (isinstance(rule, str)
                                            and getattr(RULES.get(rule), "reads_checkpoint", False))  # learned rules
    if isinstance(rule, str) and reads_folder and "checkpoint" not in rule_options and "conv" not in rule_options:
        rule_options["checkpoint"] = getattr(model, "name_or_path", None) or None
    # the rule's defaults for this runtime (``Rule.defaults_for``): a named rule is made with its step options for
    # the state rank; a rule object was made by hand, for a dense S, and keeps its own
    if isinstance(rule, str):
        defaults = rule_class(rule).defaults_for(rule_options, state_rank)
        rule_options = with_defaults(defaults.steps, rule_options)
        rule_obj = make_rule(rule, **rule_options)
    else:
        rule_obj = make_rule(rule, **rule_options)
        defaults = rule_obj.defaults_for(rule_obj.options())
    decoder_layers = get_path(model, spec.layers)
    opts = _defaults(rule_obj, chunk_size, layers, lr, decay, clip, norm_bound, defaults.norm_bound)
    config = RuntimeConfig(rule=rule_obj.name, chunk_size=opts["chunk_size"],
                           layers=select_layers(opts["layers"], len(decoder_layers)), lr=opts["lr"],
                           decay=opts["decay"], clip=opts["clip"], state_dtype=state_dtype,
                           options=rule_obj.options(), norm_bound=opts["norm_bound"], state_rank=state_rank)
    plastic: dict[int, PlasticDown] = {}
    hooks = []
    for i in config.layers:
        layer = decoder_layers[i]
        wrapper = PlasticDown(get_path(layer, spec.down), i, spec.conv1d)
        set_path(layer, spec.down, wrapper)
        plastic[i] = wrapper
        hooks.append(get_path(layer, spec.mlp_in).register_forward_pre_hook(Tap(wrapper, "h", hidden)))
    if rule_obj.reads_final_norm:
        tap = Tap(plastic[max(plastic)], FINAL_SCALE, final_scale)  # recorded in the last layer's binding
        hooks.append(get_path(model, spec.final_norm).register_forward_pre_hook(tap))
    fp = fingerprint([plastic[i].weight0 for i in config.layers])
    rt = Runtime(model, spec, config, rule_obj, plastic, hooks, fp)
    try:
        rule_obj.bind(model, spec, config)
    except Exception:
        rt.unpatch()
        raise
    return rt

