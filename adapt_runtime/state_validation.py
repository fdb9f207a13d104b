"""Checks of a state file's contents before any of it becomes a state: every tensor and counter is checked for
finiteness, shape, dtype, range and consistency against the runtime it is loaded into.

Two kinds of refusal: ``IncompatibleStateError`` for a well-formed file of another model, rule, rule options,
layers, chunk size, state dtype or format version (the server answers 409), ``MalformedStateError`` for anything
else (400): damaged bytes, missing or unknown tensors, and values that no run of this runtime produces.

Bounds on magnitudes (finite is not enough: a finite S of 3e38 overflows the first matmul):

* ``S``: every entry ``|S| <= MAX_DELTA_ABS`` (1e5), and ``<= finfo(W0.dtype).max / 4`` so that ``W0 + S`` stays
  finite in the model's dtype (float16 holds at most 65504). Down-projection weights of trained models are below 1;
  the largest entries measured (2-core CPU machine, 2000 tokens each): 11.3 for the bundled model under hebbian at
  its default rate, 230 for the tests' tiny random Gemma2 under gradient at lr 2 (it saturates there). The bound
  leaves a margin of ~400x over that and refuses forged magnitudes (3e38) long before a matmul can overflow.
* KV entries, pending rows and targets, ``last_logits``: ``max|x| <= MAX_ACTIVATION`` (1e6). Activations of trained
  models stay far below (outlier features reach the 1e3-1e4 range), and larger keys overflow attention scores.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adapt_runtime.errors import IncompatibleStateError, MalformedStateError

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import StateSpec

MAX_DELTA_ABS = 1e5
MAX_ACTIVATION = 1e6
COUNTERS = ("writes", "refused_writes", "pending_chunk", "kv_tokens")
# Rule options that name where something was read from rather than how the rule behaves (moving a checkpoint
# folder does not change a state's meaning; the values read from it are options of their own).
LOCATION_OPTIONS = frozenset({"checkpoint"})
_KEY = re.compile(r"^(?:S\.(\d+)|tokens|last_logits|pending\.positions|pending\.target\.(\w+)|"
                  r"pending\.(\w+)\.(\d+)|kv\.(\d+)\.[kv])$")


def _same(meta: dict[str, str], key: str, expected: str, what: str) -> None:
    if meta.get(key) != expected:
        raise IncompatibleStateError(f"state file does not match this runtime: {what} is {meta.get(key)!r}, "
                                     f"the runtime has {expected!r}")


def check_compatible(meta: dict[str, str], spec: StateSpec) -> None:
    """The file was written for this model, rule (with its options), layers, chunk size and state dtype."""
    _same(meta, "rule", spec.rule, "the rule")
    _same(meta, "layers", json.dumps(list(spec.layers)), "the plastic layers")
    _same(meta, "chunk_size", str(spec.chunk_size), "the chunk size")
    _same(meta, "state_dtype", str(spec.dtype).removeprefix("torch."), "the state dtype")
    _same(meta, "fingerprint", spec.fingerprint, "the base model fingerprint")  # last: it also covers the layers
    try:
        options = json.loads(meta["config"])["options"]
    except (KeyError, TypeError, ValueError):
        raise MalformedStateError("state file metadata has no readable rule options ('config')") from None
    if not isinstance(options, dict):
        raise MalformedStateError("state file metadata: the rule options are not an object")
    expected = json.loads(spec.config_json).get("options", {})
    for name in sorted((set(options) | set(expected)) - LOCATION_OPTIONS):
        if options.get(name) != expected.get(name):
            raise IncompatibleStateError(
                f"state file does not match this runtime: rule option {name!r} is {options.get(name)!r}, "
                f"the runtime has {expected.get(name)!r}")


def read_counters(meta: dict[str, str]) -> dict[str, int]:
    """The counters of the metadata, each an integer (``pending_chunk`` >= -1, the others >= 0)."""
    try:
        counters = json.loads(meta["counters"])
    except (KeyError, TypeError, ValueError):
        raise MalformedStateError("state file metadata has no readable 'counters'") from None
    if not isinstance(counters, dict):
        raise MalformedStateError("state file metadata: 'counters' is not an object")
    out = {}
    for name in COUNTERS:
        value = counters.get(name)
        if type(value) is not int or value < (-1 if name == "pending_chunk" else 0):
            raise MalformedStateError(f"state file counter {name!r} is {value!r}, expected an integer >= "
                                      f"{-1 if name == 'pending_chunk' else 0}")
        out[name] = value
    return out


def check_tensors(tensors: dict[str, Tensor], counters: dict[str, int], rt: Runtime) -> None:
    """Every tensor of the file against ``rt``; raises ``MalformedStateError`` naming the first problem."""
    spec = rt.state_spec
    for key in tensors:
        match = _KEY.match(key)
        if match is None or (match.group(1) is not None and int(match.group(1)) not in spec.layers):
            raise MalformedStateError(f"state file holds an unknown tensor {key!r}")
    for layer, (d, f) in zip(spec.layers, spec.shapes):
        if f"S.{layer}" in tensors:
            check_delta(tensors[f"S.{layer}"], layer, (d, f), rt)
    tokens = _ints(tensors, "tokens")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= rt.vocab_size):
        raise MalformedStateError(f"state file tokens must be ids in [0, {rt.vocab_size})")
    n_tokens = tokens.numel()
    if "last_logits" in tensors:
        _values(tensors["last_logits"], "last_logits", (rt.vocab_size,))
        if not n_tokens:
            raise MalformedStateError("state file has last_logits but no tokens")
    _check_pending(tensors, counters["pending_chunk"], n_tokens, rt)
    _check_kv(tensors, counters["kv_tokens"], n_tokens, rt)


def check_delta(s: Tensor, layer: int, shape: tuple[int, int], rt: Runtime) -> None:
    """The fast weight ``s`` of ``layer`` is one this runtime can hold: ``shape`` in the state dtype, finite, every
    entry within the S bound (see the module docstring); raises ``MalformedStateError``. Every way into a session's S
    (a state file, an adapter) goes through this check, so that whatever one accepts the other loads again."""
    spec = rt.state_spec
    if tuple(s.shape) != shape or s.dtype != spec.dtype:
        raise MalformedStateError(f"S of layer {layer} is {tuple(s.shape)} {s.dtype}, expected {shape} {spec.dtype}")
    if not torch.isfinite(s).all():
        raise MalformedStateError(f"S of layer {layer} holds non-finite values")
    weight = rt.plastic[layer].weight0
    limit = min(MAX_DELTA_ABS, torch.finfo(weight.dtype).max / 4)
    peak = float(s.abs().max()) if s.numel() else 0.0
    if peak > limit:
        raise MalformedStateError(f"S of layer {layer} has entries up to {peak:.3g}, above the bound {limit:.3g} "
                                  "on fast-weight entries; no session of this runtime reaches that")


def _ints(tensors: dict[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise MalformedStateError(f"state file is incomplete: no {key!r}")
    value = tensors[key]
    if value.dtype != torch.int64 or value.ndim != 1:
        raise MalformedStateError(f"state file {key!r} must be a 1-D int64 tensor, got {value.dtype} "
                                  f"{tuple(value.shape)}")
    return value


def _values(t: Tensor, key: str, shape: tuple[int | None, ...]) -> None:
    """A floating tensor of ``shape`` (None: any size), finite and within ``MAX_ACTIVATION``."""
    if not t.is_floating_point() or t.ndim != len(shape) or any(e is not None and n != e
                                                                for n, e in zip(t.shape, shape)):
        raise MalformedStateError(f"state file tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected a floating "
                                  f"tensor of shape {tuple('*' if e is None else e for e in shape)}")
    if t.numel() and not torch.isfinite(t).all():
        raise MalformedStateError(f"state file tensor {key!r} holds non-finite values")
    if t.numel() and float(t.abs().max()) > MAX_ACTIVATION:
        raise MalformedStateError(f"state file tensor {key!r} has values above {MAX_ACTIVATION:g}")


def _check_pending(tensors: dict[str, Tensor], chunk: int, n_tokens: int, rt: Runtime) -> None:
    spec, C = rt.state_spec, rt.state_spec.chunk_size
    positions = _ints(tensors, "pending.positions").tolist()
    n = len(positions)
    rows = {k for k in tensors if k.startswith("pending.") and k != "pending.positions"}
    if not n:
        if chunk != -1 or rows:
            raise MalformedStateError("state file has pending rows or a pending chunk but no pending positions")
        return
    if chunk < 0 or any(b <= a for a, b in zip(positions, positions[1:])) or positions[0] < chunk * C \
            or positions[-1] >= min((chunk + 1) * C, n_tokens):
        raise MalformedStateError(f"state file pending positions must increase within chunk {chunk} "
                                  f"([{chunk * C}, {(chunk + 1) * C})) and the {n_tokens} tokens")
    dims = {"x": 1, "y": 0, "h": 0}
    for name in sorted(rt.rule.capture):
        for layer, shape in zip(spec.layers, spec.shapes):
            key = f"pending.{name}.{layer}"
            if key not in tensors:
                raise MalformedStateError(f"state file is incomplete: no {key!r} for its {n} pending positions")
            _values(tensors[key], key, (n, shape[dims.get(name, 0)]))
            rows.discard(key)
    d = spec.shapes[0][0]
    for key in sorted(rows):
        if not key.startswith("pending.target."):
            raise MalformedStateError(f"state file holds pending rows {key!r} that the rule does not capture")
        t = tensors[key]
        _values(t, key, (None,) if t.ndim == 1 else (None, d))
        if t.shape[0] > n:
            raise MalformedStateError(f"state file {key!r} has {t.shape[0]} rows for {n} pending positions")


def kv_geometry(rt: Runtime) -> tuple[int | None, int | None, int | None]:
    """(layers, kv heads, head dim) of the model's attention cache, None where the config does not say."""
    cfg = rt.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None and heads and getattr(cfg, "hidden_size", None):
        head_dim = cfg.hidden_size // heads
    return layers, kv_heads, head_dim


def _check_kv(tensors: dict[str, Tensor], kv_tokens: int, n_tokens: int, rt: Runtime) -> None:
    n_kv = sum(1 for k in tensors if k.startswith("kv.") and k.endswith(".k"))
    if kv_tokens > min(n_tokens, rt.max_length):
        raise MalformedStateError(f"state file KV cache of {kv_tokens} tokens is longer than its stream "
                                  f"({n_tokens} tokens) or than the model's {rt.max_length} positions")
    if not n_kv:
        if kv_tokens:
            raise MalformedStateError(f"state file counts {kv_tokens} cached tokens but holds no KV cache")
        return
    layers, kv_heads, head_dim = kv_geometry(rt)
    if layers is not None and n_kv != layers:
        raise MalformedStateError(f"state file KV cache has {n_kv} layers, the model has {layers}")
    dtype = rt.plastic[rt.state_spec.layers[0]].weight0.dtype
    for i in range(n_kv):
        k, v = tensors.get(f"kv.{i}.k"), tensors.get(f"kv.{i}.v")
        if k is None or v is None:
            raise MalformedStateError(f"state file KV cache lacks the keys or values of layer {i}")
        for name, t in ((f"kv.{i}.k", k), (f"kv.{i}.v", v)):
            _values(t, name, (1, kv_heads, None, head_dim))
            if t.dtype != dtype:
                raise MalformedStateError(f"state file tensor {name!r} is {t.dtype}, the model computes in {dtype}")
        length = k.shape[2]
        if v.shape[2] != length or length != kv_tokens:  # sliding-window layers keep their whole cache too
            raise MalformedStateError(f"state file KV cache of layer {i} holds {length} keys and {v.shape[2]} "
                                      f"values for {kv_tokens} cached tokens")


def header_metadata(data: bytes | Any) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (raises ``MalformedStateError`` when it is unreadable)."""
    try:
        size = int.from_bytes(bytes(data[:8]), "little")
        if not 0 < size <= len(data) - 8:
            raise ValueError("header length out of range")
        header = json.loads(bytes(data[8 : 8 + size]))
        meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("metadata is not a map of strings")
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedStateError(f"state file is corrupt or not a safetensors file: {err}") from None
    return dict(meta)
