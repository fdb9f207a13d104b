"""``import_lora``: a PEFT LoRA adapter on the plastic down projections as a fresh session state, S = (alpha/r) B A.

Refused with ``LoraFormatError`` (not a well-formed adapter) or ``LoraIncompatibleError`` (made for another base
model, targeting modules other than the runtime's plastic down projections or other layers, or using PEFT options
that a plain delta on W0 cannot represent: DoRA, LoRA bias, modules_to_save, per-module alpha or rank patterns).
rsLoRA scaling (alpha / sqrt(r)) is supported. The fast weights an adapter implies pass the same check as the S of
a state file (``state_validation.check_delta``: finite, every entry within the S bound), so that a session seeded
from an adapter can always be saved and loaded again; an adapter beyond it is a ``LoraFormatError``.

Into a rank-r runtime (``state_rank=r``) a layer's adapter becomes the state's factors ``B = (alpha/r) lora_B``,
``A = lora_A`` as they are (no SVD; for an adapter this runtime exported, alpha = r and the factors come back bit for
bit), without the components that contribute nothing (the zero padding of a layer of lower rank). Their rank must
be at most r (``LoraIncompatibleError`` otherwise: export the adapter at that rank), and they pass the state file's
factor check (``state_validation.check_factors``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from torch import Tensor

from adapt_runtime.errors import MalformedStateError
from adapt_runtime.lora_format import (
    CONFIG_NAME,
    FACTORS,
    KEY_PREFIX,
    METADATA_KEY,
    WEIGHTS_NAME,
    LoraFormatError,
    LoraIncompatibleError,
    base_model_name,
    layer_fingerprints,
    plastic_modules,
    same_base_name,
)
from adapt_runtime.plastic import PlasticDown
from adapt_runtime.state import FastWeights
from adapt_runtime.state_validation import check_delta, check_factors

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime

# PEFT options (with the value that means "off") that change what the adapter computes beyond (alpha/r) B A x
_UNSUPPORTED: dict[str, object] = {"use_dora": False, "lora_bias": False, "modules_to_save": None, "alpha_pattern": {},
                "rank_pattern": {}, "target_parameters": None, "trainable_token_indices": None,
                "layer_replication": None, "use_qalora": False, "megatron_config": None}


def _parse_config(data: bytes) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise LoraFormatError(f"{CONFIG_NAME} is not valid JSON: {err}") from None
    except RecursionError:
        raise LoraFormatError(f"{CONFIG_NAME} is nested too deeply to be an adapter config") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{CONFIG_NAME} must hold a JSON object")
    if "peft_type" not in config:
        raise LoraFormatError(f"{CONFIG_NAME} has no peft_type; this is not a PEFT adapter config")
    if str(config["peft_type"]).upper() != "LORA":
        raise LoraIncompatibleError(f"peft_type is {config['peft_type']!r}; only LORA adapters can seed a session")
    for key, off in _UNSUPPORTED.items():
        value = config.get(key, off)
        if value not in (off, None, False, {}, []):
            raise LoraIncompatibleError(f"the adapter uses {key}={value!r}, which a fast-weight delta on the down "
                                        "projection cannot represent; export it without that option")
    if config.get("bias", "none") not in ("none", None):
        raise LoraIncompatibleError(f"the adapter trains biases (bias={config['bias']!r}); only bias='none' is "
                                    "supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite_positive(value):
            raise LoraFormatError(f"{CONFIG_NAME}: {key} must be a finite positive number, got {str(value)[:40]}")
    if int(config["r"]) != config["r"]:
        raise LoraFormatError(f"{CONFIG_NAME}: r must be an integer, got {config['r']!r}")
    return config


def _finite_positive(value: int | float) -> bool:
    try:
        number = float(value)  # a JSON integer of hundreds of digits overflows a float
    except OverflowError:
        return False
    return math.isfinite(number) and number > 0


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def targets(config: dict[str, Any], key: str) -> bool:
    """Whether PEFT would put a LoRA on the module named ``key`` (its target_modules, exclude_modules and
    layers_to_transform rules)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    wanted = config.get("target_modules")
    if isinstance(wanted, str):
        return re.fullmatch(wanted, key) is not None
    if not isinstance(wanted, list) or not (key in wanted or any(key.endswith(f".{t}") for t in wanted)):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(key, config.get("layers_pattern"))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def _leaf_modules(rt: Runtime) -> list[str]:
    """Names of the model's leaf modules as in the unpatched model (a plastic wrapper counts as its base)."""
    plastic = set(plastic_modules(rt))
    def leaf(name: str, module: torch.nn.Module) -> bool:
        inside = isinstance(module, PlasticDown) or any(name.startswith(p + ".") for p in plastic)
        return not inside and next(module.children(), None) is None

    return [name for name, module in rt.model.named_modules() if name in plastic or leaf(name, module)]


def _check_targets(rt: Runtime, config: dict[str, Any]) -> set[str]:
    wanted = config.get("target_modules")
    if wanted == "all-linear":
        raise LoraIncompatibleError("the adapter targets all linear layers; only the plastic down projections "
                                    f"({', '.join(plastic_modules(rt))}) can seed a session")
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        names = [value] if isinstance(value, str) else value
        if (key == "target_modules" or value is not None) and not (
                isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
            raise LoraFormatError(f"{CONFIG_NAME}: {key} must be a module name list or a regex string")
    if not wanted:
        raise LoraFormatError(f"{CONFIG_NAME}: target_modules is empty")
    for key in ("target_modules", "exclude_modules"):
        try:
            re.compile(config[key] if isinstance(config.get(key), str) else "")
        except re.error as err:
            raise LoraFormatError(f"{CONFIG_NAME}: {key} is not a valid regex: {err}") from None
    plastic = plastic_modules(rt)
    matched = {name for name in _leaf_modules(rt) if targets(config, name)}
    others = sorted(matched - set(plastic))
    if others:
        listed = ", ".join(others[:4]) + (" ..." if len(others) > 4 else "")
        raise LoraIncompatibleError(f"the adapter targets modules that are not plastic down projections of this "
                                    f"runtime: {listed} (plastic: {', '.join(plastic)})")
    if not matched:
        raise LoraIncompatibleError(f"the adapter's target_modules {wanted!r} match none of this model's plastic "
                                    f"down projections ({', '.join(plastic)})")
    return matched


def _load_weights(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the W0 hash per layer that an export by this runtime records (empty for other adapters)."""
    try:
        tensors = st_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except Exception as err:  # safetensors raises several types for damaged bytes
        raise LoraFormatError(f"{WEIGHTS_NAME} is corrupt or not a safetensors file: {err}") from None
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    if METADATA_KEY not in meta:
        return tensors, {}
    try:
        hashes = json.loads(meta[METADATA_KEY]).get("w0_sha256") or {}
    except (ValueError, AttributeError, RecursionError):
        raise LoraFormatError(f"{WEIGHTS_NAME}: the {METADATA_KEY} metadata is not a JSON object") from None
    if not isinstance(hashes, dict):
        raise LoraFormatError(f"{WEIGHTS_NAME}: w0_sha256 in the {METADATA_KEY} metadata is not an object")
    return tensors, {str(k): str(v) for k, v in hashes.items()}


def _split_key(key: str) -> tuple[str, str]:
    if not key.startswith(KEY_PREFIX):
        raise LoraFormatError(f"tensor {key!r} is not a PEFT adapter weight (names start with {KEY_PREFIX!r})")
    for factor in FACTORS:
        if key.endswith("." + factor):
            return key[len(KEY_PREFIX) : -len(factor) - 1], factor
    module, _, rest = key[len(KEY_PREFIX) :].partition(".lora_")
    raise LoraIncompatibleError(f"tensor {key!r} of module {module!r} is not a plain lora_A/lora_B weight "
                                "(DoRA magnitudes, embedding adapters and biases are not supported)")


def _as_factors(rt: Runtime, module: str, layer: int, B: Tensor, A: Tensor, scale: float, rank: int
                ) -> tuple[Tensor, Tensor] | None:
    """A rank-r runtime's factors ``(scale B, A)`` of one module, without the components that contribute nothing;
    None when none is left. ``rank``: the runtime's state rank."""
    spec = rt.state_spec
    shape = spec.shapes[spec.layers.index(layer)]
    B = (B.to(torch.float64) * scale).to(torch.float32)  # exact for scale 1 and a float32 B
    A = A.to(torch.float32)
    keep = B.any(dim=0) & A.any(dim=1)
    B, A = B[:, keep].contiguous(), A[keep].contiguous()
    if not keep.any():
        return None
    if B.shape[1] > rank:
        raise LoraIncompatibleError(f"module {module!r}: the adapter has rank {B.shape[1]}, but this runtime holds "
                                    f"states of rank at most {rank} (state_rank); export the adapter with rank "
                                    f"<= {rank}")
    try:  # the factors a state file could hold, checked as a state import checks them
        check_factors(B, A, layer, shape, rank, rt)
    except MalformedStateError as err:
        raise LoraFormatError(f"module {module!r}: the factors (alpha/r) lora_B, lora_A of the adapter are refused: "
                              f"{err}") from None
    return B.to(spec.device), A.to(spec.device)


def lora_from_files(rt: Runtime, config_bytes: bytes, weights_bytes: bytes) -> FastWeights:
    """A fresh state from an adapter's two files in memory (see ``import_lora``)."""
    config = _parse_config(config_bytes)
    base = config.get("base_model_name_or_path")
    ours = base_model_name(rt)
    if not same_base_name(base, ours):
        served = str(ours).rstrip("/").rsplit("/", 1)[-1]
        raise LoraIncompatibleError(f"the adapter is for base model {base!r}; this runtime's base model is "
                                    f"{served!r}")
    matched = _check_targets(rt, config)
    tensors, hashes = _load_weights(weights_bytes)
    plastic = plastic_modules(rt)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        module, factor = _split_key(key)
        if module not in plastic:
            raise LoraIncompatibleError(f"the adapter has weights for {module!r}, which is not a plastic down "
                                        f"projection of this runtime (plastic: {', '.join(plastic)})")
        if module not in matched:
            raise LoraFormatError(f"the adapter has weights for {module!r} but its target_modules do not name it")
        factors.setdefault(module, {})[factor] = tensor
    r = int(config["r"])
    scale = float(config["lora_alpha"]) / (math.sqrt(r) if config.get("use_rslora") else r)  # finite: r >= 1
    spec = rt.state_spec
    state = rt.new_state()
    for module, pair in factors.items():
        layer = plastic[module]
        d, f = spec.shapes[spec.layers.index(layer)]
        if hashes.get(str(layer), layer_fingerprints(rt)[layer]) != layer_fingerprints(rt)[layer]:
            raise LoraIncompatibleError(f"the adapter was exported from another base model (the weights of {module} "
                                        "differ from this model's)")
        if set(pair) != set(FACTORS):
            raise LoraFormatError(f"module {module!r} has {sorted(pair)} but needs both lora_A and lora_B weights")
        A, B = pair["lora_A.weight"], pair["lora_B.weight"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != f or B.shape[0] != d:
            raise LoraIncompatibleError(f"module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do "
                                        f"not fit this model's down projection [{d}, {f}] (another base model?)")
        if A.shape[0] != r or B.shape[1] != r:
            raise LoraFormatError(f"module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not "
                                  f"have the config's rank r={r}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise LoraFormatError(f"module {module!r} holds non-finite weights")
        if spec.state_rank is not None:
            held = _as_factors(rt, module, layer, B, A, scale, spec.state_rank)
            if held is not None:
                state.factors[layer] = held
            continue
        S = ((B.to(torch.float64) @ A.to(torch.float64)) * scale).to(device=spec.device, dtype=spec.dtype)
        try:  # the S a state file could hold, checked as a state import checks it (overflow is non-finite here)
            check_delta(S, layer, (d, f), rt)
        except MalformedStateError as err:
            raise LoraFormatError(f"module {module!r}: the fast weights (alpha/r) B A of the adapter (lora_alpha "
                                  f"{config['lora_alpha']:g}, r {r}) are refused: {err}") from None
        if bool(S.any()):
            state.S[layer] = S
    state.bump()
    return state


def import_lora(rt: Runtime, path: str | Path) -> FastWeights:
    """A fresh state (empty stream, no KV) whose fast weights are the PEFT LoRA adapter at ``path``.

    Args:
        rt: the runtime; the adapter must target a subset of its plastic down projections.
        path: an adapter directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Raises:
        LoraFormatError: the directory does not hold a well-formed PEFT LoRA adapter.
        LoraIncompatibleError: the adapter is for another base model, other modules or layers, or uses DoRA or
            other options a delta on W0 cannot represent.
    """
    folder = Path(path)
    try:
        config_bytes = (folder / CONFIG_NAME).read_bytes()
    except OSError as err:
        raise LoraFormatError(f"cannot read {folder / CONFIG_NAME}: {err.strerror}") from None
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / "adapter_model.bin").is_file():
        raise LoraFormatError(f"{folder} holds adapter_model.bin; only {WEIGHTS_NAME} is read (no pickle files)")
    try:
        weights_bytes = weights.read_bytes()
    except OSError as err:
        raise LoraFormatError(f"cannot read {weights}: {err.strerror}") from None
    return lora_from_files(rt, config_bytes, weights_bytes)
