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
* Factors ``B``, ``A`` of a rank-r runtime (``state_rank``; S = B A): shapes ``[d, k]``, ``[k, f]`` with
  ``k <= r``, each factor's entries and the S they imply within the S bound (``check_factors``). A rank-r runtime's
  file holds no dense S and a dense runtime's no factors; a file of another state rank is incompatible.
* KV entries, pending rows and targets (``pending.retrieved.<layer>``, ``S x`` of every pending position, is
  optional: ``[n, d]``), ``last_logits``: ``max|x| <= MAX_ACTIVATION`` (1e6). Activations of trained
  models stay far below (outlier features reach the 1e3-1e4 range), and larger keys overflow attention scores.
* Counters and positions: integers in ``[0, MAX_POSITION]`` (2^40, about 1.1e12 tokens: days of a whole server's
  throughput in one session); ``writes + refused_writes`` at most the chunks the stream has completed (one write,
  or one refusal, per chunk).

The pending chunk must be the stream's current chunk: its positions lie in chunk ``pending_chunk`` and the stream
has not gone past that chunk's end. The gradient rule recomputes the pending chunk when it completes; a pending
chunk left behind a long stream would have cost a recompute of the whole stream (``chunk_grad.recompute`` is also
bounded to one chunk on its own).
"""

from __future__ import annotations

import json
import re
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adapt_runtime.chunk import FINAL_SCALE, RETRIEVAL_KEY
from adapt_runtime.errors import IncompatibleStateError, MalformedStateError

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import StateSpec

MAX_DELTA_ABS = 1e5
MAX_ACTIVATION = 1e6
MAX_POSITION = 2**40
COUNTERS = ("writes", "refused_writes", "pending_chunk", "kv_tokens")
OPTIONAL_COUNTERS = {"tokens_offset": 0}  # files written before streams were compacted hold every token
# Rule options that name where something was read from rather than how the rule behaves (moving a checkpoint
# folder does not change a state's meaning; the values read from it are options of their own).
LOCATION_OPTIONS = frozenset({"checkpoint"})
_KEY = re.compile(r"^(?:S\.(\d+)|tokens|last_logits|pending\.positions|pending\.target\.(\w+)|"
                  r"pending\.(\w+)\.(\d+)|kv\.(\d+)\.[kv]|[AB]\.(?P<factor>\d+)"
                  r"|(?P<extra>momentum|slow)\.(?P<extra_layer>\d+))$")
# per-layer tensors a rule's steps keep besides S (``adapt_runtime.rules.steps``), checked as S is
EXTRA_TENSORS = ("momentum", "slow")
PRODUCT_BLOCK = 2**22  # entries of S = B A formed at once when its bound must be checked on the product itself


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
    rank = spec.state_rank
    if meta.get("state_rank") != (None if rank is None else str(rank)):
        raise IncompatibleStateError(
            f"state file does not match this runtime: its state rank is {meta.get('state_rank') or 'dense'}, the "
            f"runtime's is {rank or 'dense'} (state_rank)")
    _same(meta, "fingerprint", spec.fingerprint, "the base model fingerprint")  # last: it also covers the layers
    _check_shapes(meta, spec)
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


def _check_shapes(meta: dict[str, str], spec: StateSpec) -> None:
    """The ``shapes`` metadata states the runtime's ``(d, f)`` per plastic layer (a file of this model cannot
    hold others: a different value is a forgery, not another configuration)."""
    try:
        shapes = json.loads(meta["shapes"])
    except (KeyError, TypeError, ValueError):
        raise MalformedStateError("state file metadata has no readable 'shapes'") from None
    expected = [list(shape) for shape in spec.shapes]
    if shapes != expected or not all(type(n) is int for shape in shapes for n in shape):
        raise MalformedStateError(f"state file metadata 'shapes' is {meta['shapes'][:200]!r}, but the plastic "
                                  f"layers {list(spec.layers)} of this model have the shapes {expected}")


def read_counters(meta: dict[str, str]) -> dict[str, int]:
    """The counters of the metadata, each an integer in ``[0, MAX_POSITION]`` (``pending_chunk`` may be -1)."""
    try:
        counters = json.loads(meta["counters"])
    except (KeyError, TypeError, ValueError):
        raise MalformedStateError("state file metadata has no readable 'counters'") from None
    if not isinstance(counters, dict):
        raise MalformedStateError("state file metadata: 'counters' is not an object")
    unknown = sorted(set(counters) - set(COUNTERS) - set(OPTIONAL_COUNTERS))
    if unknown:
        raise MalformedStateError(f"state file holds unknown counters {unknown[:5]}")
    out = {}
    for name in (*COUNTERS, *OPTIONAL_COUNTERS):
        value = counters.get(name, OPTIONAL_COUNTERS.get(name))
        low = -1 if name == "pending_chunk" else 0
        if type(value) is not int or not low <= value <= MAX_POSITION:
            raise MalformedStateError(f"state file counter {name!r} is {value!r}, expected an integer in "
                                      f"[{low}, {MAX_POSITION}]")
        out[name] = value
    return out


def check_tensors(tensors: dict[str, Tensor], counters: dict[str, int], rt: Runtime) -> None:
    """Every tensor of the file against ``rt``; raises ``MalformedStateError`` naming the first problem."""
    spec = rt.state_spec
    for key in tensors:
        match = _KEY.match(key)
        layer = None if match is None else match.group(1) or match.group("factor")
        if match is None or (layer is not None and int(layer) not in spec.layers):
            raise MalformedStateError(f"state file holds an unknown tensor {key!r}")
        extra = match.group("extra")
        if extra is not None and (int(match.group("extra_layer")) not in spec.layers
                                  or extra not in getattr(getattr(rt.rule, "steps", None), "extras", ())):
            raise MalformedStateError(f"state file holds {key!r}, which this rule's steps do not keep")
    for layer, (d, f) in zip(spec.layers, spec.shapes):
        if f"S.{layer}" in tensors:
            check_delta(tensors[f"S.{layer}"], layer, (d, f), rt)
        for name in EXTRA_TENSORS:
            if f"{name}.{layer}" in tensors:
                check_delta(tensors[f"{name}.{layer}"], layer, (d, f), rt)
        _check_layer_factors(tensors, layer, (d, f), rt)
    tokens = _ints(tensors, "tokens")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= rt.vocab_size):
        raise MalformedStateError(f"state file tokens must be ids in [0, {rt.vocab_size})")
    offset = counters["tokens_offset"]
    n_tokens = offset + tokens.numel()  # the stream's length; the file holds its tail from ``offset`` on
    if n_tokens > MAX_POSITION:
        raise MalformedStateError(f"state file stream of {n_tokens} tokens is longer than {MAX_POSITION}")
    chunks = n_tokens // spec.chunk_size
    if counters["writes"] + counters["refused_writes"] > chunks:
        raise MalformedStateError(f"state file counts {counters['writes']} writes and {counters['refused_writes']} "
                                  f"refused writes for a stream of {n_tokens} tokens, which completed {chunks} "
                                  f"chunks of {spec.chunk_size} (one write or refusal per chunk)")
    if "last_logits" in tensors:
        _values(tensors["last_logits"], "last_logits", (rt.vocab_size,))
        if not n_tokens:
            raise MalformedStateError("state file has last_logits but no tokens")
    _check_pending(tensors, counters["pending_chunk"], offset, n_tokens, rt)
    _check_kv(tensors, counters["kv_tokens"], tokens.numel(), rt)


def check_delta(s: Tensor, layer: int, shape: tuple[int, int], rt: Runtime) -> None:
    """The fast weight ``s`` of ``layer`` is one this runtime can hold: ``shape`` in the state dtype, finite, every
    entry within the S bound (see the module docstring); raises ``MalformedStateError``. Every way into a session's S
    (a state file, an adapter) goes through this check, so that whatever one accepts the other loads again."""
    spec = rt.state_spec
    if tuple(s.shape) != shape or s.dtype != spec.dtype:
        raise MalformedStateError(f"S of layer {layer} is {tuple(s.shape)} {s.dtype}, expected {shape} {spec.dtype}")
    if not torch.isfinite(s).all():
        raise MalformedStateError(f"S of layer {layer} holds non-finite values")
    limit = _delta_limit(layer, rt)
    peak = float(s.abs().max()) if s.numel() else 0.0
    if peak > limit:
        raise MalformedStateError(f"S of layer {layer} has entries up to {peak:.3g}, above the bound {limit:.3g} "
                                  "on fast-weight entries; no session of this runtime reaches that")


def _delta_limit(layer: int, rt: Runtime) -> float:
    """The bound on the entries of a layer's S (see the module docstring)."""
    return min(MAX_DELTA_ABS, torch.finfo(rt.plastic[layer].weight0.dtype).max / 4)


def _check_layer_factors(tensors: dict[str, Tensor], layer: int, shape: tuple[int, int], rt: Runtime) -> None:
    """A rank-r runtime's file holds factors ``B.<layer>``, ``A.<layer>`` (both or neither) and no dense S; a dense
    runtime's file holds no factors."""
    rank, B, A = rt.state_spec.state_rank, tensors.get(f"B.{layer}"), tensors.get(f"A.{layer}")
    if rank is None:
        if B is not None or A is not None:
            raise MalformedStateError(f"state file holds factors of layer {layer}, but this runtime keeps a dense S "
                                      "(it has no state_rank)")
        return
    if f"S.{layer}" in tensors:
        raise MalformedStateError(f"state file holds a dense S of layer {layer}, but this runtime keeps rank-{rank} "
                                  "factors B A")
    if (B is None) != (A is None):
        raise MalformedStateError(f"state file holds {'B' if A is None else 'A'} of layer {layer} without "
                                  f"{'A' if A is None else 'B'}")
    if B is not None:
        check_factors(B, A, layer, shape, rank, rt)


def check_factors(B: Tensor, A: Tensor, layer: int, shape: tuple[int, int], rank: int, rt: Runtime) -> None:
    """The factors ``S = B A`` of ``layer`` are ones a rank-``rank`` runtime can hold: ``B [d, k]``, ``A [k, f]``
    with ``1 <= k <= rank`` in the state dtype, finite, every entry of each factor and of the S they imply within
    the S bound (``check_delta``'s). The product is formed (in row blocks) only when the Cauchy-Schwarz bound
    ``|S_ij| <= ||B_i|| ||A_:j||`` does not settle it. A runtime's own factors stay far inside the factor bound: A
    has orthonormal rows and each row of B is at most the norm of S's row. Raises ``MalformedStateError``."""
    spec, (d, f) = rt.state_spec, shape
    if (B.dtype != spec.dtype or A.dtype != spec.dtype or B.ndim != 2 or A.ndim != 2 or B.shape[0] != d
            or A.shape[1] != f or B.shape[1] != A.shape[0] or not 1 <= B.shape[1] <= rank):
        raise MalformedStateError(f"factors of layer {layer} are B {tuple(B.shape)} {B.dtype} and A "
                                  f"{tuple(A.shape)} {A.dtype}, expected B [{d}, k] and A [k, {f}] in {spec.dtype} "
                                  f"with 1 <= k <= {rank} (the state rank)")
    limit = _delta_limit(layer, rt)
    for name, t in (("B", B), ("A", A)):
        if not torch.isfinite(t).all():
            raise MalformedStateError(f"factor {name} of layer {layer} holds non-finite values")
        peak = float(t.abs().max())
        if peak > limit:
            raise MalformedStateError(f"factor {name} of layer {layer} has entries up to {peak:.3g}, above the bound "
                                      f"{limit:.3g}; no session of this runtime reaches that")
    B, A = B.float(), A.float()
    if float(B.norm(dim=1).max()) * float(A.norm(dim=0).max()) <= limit:
        return
    rows = max(1, PRODUCT_BLOCK // f)
    peak = max(float((B[i : i + rows] @ A).abs().max()) for i in range(0, d, rows))
    if not peak <= limit:  # a product that overflows is inf (and nan is no number below the bound)
        raise MalformedStateError(f"S = B A of layer {layer} has entries up to {peak:.3g}, above the bound "
                                  f"{limit:.3g} on fast-weight entries; no session of this runtime reaches that")


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


def _check_pending(tensors: dict[str, Tensor], chunk: int, offset: int, n_tokens: int, rt: Runtime) -> None:
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
    if n_tokens > (chunk + 1) * C:
        raise MalformedStateError(f"state file pending chunk {chunk} (positions [{chunk * C}, {(chunk + 1) * C})) "
                                  f"is not the stream's current chunk: the stream holds {n_tokens} tokens, so its "
                                  f"current chunk is {(n_tokens - 1) // C}")
    if positions[0] < offset:
        raise MalformedStateError(f"state file pending positions start at {positions[0]}, before the first token it "
                                  f"holds (position {offset})")
    dims = {"x": 1, "y": 0, "h": 0}
    for name in sorted(rt.rule.capture):
        for layer, shape in zip(spec.layers, spec.shapes):
            key = f"pending.{name}.{layer}"
            if key not in tensors:
                raise MalformedStateError(f"state file is incomplete: no {key!r} for its {n} pending positions")
            _values(tensors[key], key, (n, shape[dims.get(name, 0)]))
            rows.discard(key)
    for layer, shape in zip(spec.layers, spec.shapes):  # optional: S x of every pending position, where recorded
        key = f"pending.{RETRIEVAL_KEY}.{layer}"
        if key in tensors:
            _values(tensors[key], key, (n, shape[0]))
            rows.discard(key)
    for key in sorted(rows):
        if not key.startswith("pending.target."):
            raise MalformedStateError(f"state file holds pending rows {key!r} that the rule does not capture")
    _check_targets(tensors, n, rt)


_TARGET_SHAPES: weakref.WeakKeyDictionary[Runtime, dict[str, tuple[int, ...]]] = weakref.WeakKeyDictionary()


def target_shapes(rt: Runtime) -> dict[str, tuple[int, ...]]:
    """Per target name the rule stashes for each labelled position, the shape of one position's entry (asked of
    the rule itself, once per runtime, on one dummy position)."""
    shapes = _TARGET_SHAPES.get(rt)
    if shapes is None:
        shapes = {}
        if rt.rule.adapts and rt.rule.stashes_targets:
            with torch.no_grad():
                logits = torch.zeros(1, rt.vocab_size, device=rt.device)
                out = rt.rule.targets(logits, torch.zeros(1, dtype=torch.long, device=rt.device))
            shapes = {name: tuple(t.shape[1:]) for name, t in out.items()}
        _TARGET_SHAPES[rt] = shapes
    return shapes


def _check_targets(tensors: dict[str, Tensor], n: int, rt: Runtime) -> None:
    """``pending.target.<name>``: each a name the rule computes, of its shape per position; the rule's targets
    all for the same first ``m <= n`` positions (all of them or none), the final norm's scale for all ``n``."""
    expected = target_shapes(rt)
    present = {k.removeprefix("pending.target."): t for k, t in tensors.items() if k.startswith("pending.target.")}
    for name, t in sorted(present.items()):
        key = f"pending.target.{name}"
        if name == FINAL_SCALE:
            if not rt.rule.reads_final_norm:
                raise MalformedStateError(f"state file holds {key!r}, but the rule does not read the final norm")
            _values(t, key, (n,))
            continue
        if name not in expected:
            raise MalformedStateError(f"state file holds a pending target {key!r} that the rule does not compute "
                                      f"(it computes {sorted(expected) or 'none'})")
        _values(t, key, (None, *expected[name]))
        if t.shape[0] > n:
            raise MalformedStateError(f"state file {key!r} has {t.shape[0]} rows for {n} pending positions")
    if rt.rule.adapts and rt.rule.reads_final_norm and FINAL_SCALE not in present:
        raise MalformedStateError(f"state file is incomplete: no 'pending.target.{FINAL_SCALE}' for its {n} pending "
                                  "positions")
    counts = {name: int(present[name].shape[0]) for name in expected if name in present}
    if counts and (len(counts) != len(expected) or len(set(counts.values())) != 1):
        rows = {name: counts.get(name, "missing") for name in sorted(expected)}
        raise MalformedStateError(f"state file pending targets must cover the same labelled positions, got rows {rows}")


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
    """``n_tokens``: the tokens the file holds (the KV cache covers the last ``kv_tokens`` of them)."""
    n_kv = sum(1 for k in tensors if k.startswith("kv.") and k.endswith(".k"))
    if kv_tokens > min(n_tokens, rt.max_length):
        raise MalformedStateError(f"state file KV cache of {kv_tokens} tokens is longer than the stream it holds "
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
    except RecursionError:
        raise MalformedStateError("state file header is nested too deeply to be a safetensors header") from None
    return dict(meta)
