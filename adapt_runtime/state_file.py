"""State files: safetensors with metadata, written atomically, checked against the runtime on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapt_runtime.atomic import atomic_write
from adapt_runtime.errors import StateFileError
from adapt_runtime.state import FastWeights

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime

FORMAT = "adapt-runtime-state"
FORMAT_VERSION = "1"


def state_to_bytes(state: FastWeights, include_kv: bool = True) -> bytes:
    spec = state.spec
    tensors = {f"S.{k}": s.contiguous() for k, s in state.S.items() if s is not None}
    tensors.update({k: v.contiguous() for k, v in state.pending.tensors().items()})
    tensors["tokens"] = torch.tensor(state.tokens, dtype=torch.int64)
    tensors["pending.positions"] = torch.tensor(state.pending.positions, dtype=torch.int64)
    if state.last_logits is not None:
        tensors["last_logits"] = state.last_logits.contiguous()
    if include_kv and state.kv:
        for i, (k, v) in enumerate(state.kv):
            tensors[f"kv.{i}.k"], tensors[f"kv.{i}.v"] = k.contiguous(), v.contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": spec.fingerprint,
        "rule": spec.rule,
        "config": spec.config_json,
        "layers": json.dumps(list(spec.layers)),
        "shapes": json.dumps([list(s) for s in spec.shapes]),
        "chunk_size": str(spec.chunk_size),
        "state_dtype": str(spec.dtype).removeprefix("torch."),
        "counters": json.dumps(
            {"writes": state.writes, "refused_writes": state.refused_writes, "pending_chunk": state.pending.chunk,
             "kv_tokens": state.kv_len if include_kv else 0}
        ),
    }
    return st_save({k: v.detach().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_state(state: FastWeights, path: str | Path, include_kv: bool = True) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then rename."""
    atomic_write(path, state_to_bytes(state, include_kv=include_kv))


def _check(meta: dict[str, str], key: str, expected: str, what: str) -> None:
    if meta.get(key) != expected:
        raise StateFileError(f"state file does not match this runtime: {what} is {meta.get(key)!r}, "
                             f"the runtime has {expected!r}")


def state_from_bytes(data: bytes, rt: Runtime) -> FastWeights:
    """Rebuild a state from ``state_to_bytes`` output; raises ``StateFileError`` on corruption or mismatch."""

    try:
        tensors = st_load(data)
        meta = _metadata(data)
    except Exception as err:  # safetensors raises several types for damaged bytes
        raise StateFileError(f"state file is corrupt or not a safetensors file: {err}") from None
    if meta.get("format") != FORMAT:
        raise StateFileError("not an adapt-runtime state file (missing format metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StateFileError(f"unsupported state format version {meta.get('format_version')!r}")
    spec = rt.state_spec
    _check(meta, "fingerprint", spec.fingerprint, "the base model fingerprint")
    _check(meta, "rule", spec.rule, "the rule")
    _check(meta, "layers", json.dumps(list(spec.layers)), "the plastic layers")
    _check(meta, "chunk_size", str(spec.chunk_size), "the chunk size")
    _check(meta, "state_dtype", str(spec.dtype).removeprefix("torch."), "the state dtype")
    state = rt.new_state()
    try:
        for layer, (d, f) in zip(spec.layers, spec.shapes):
            s = tensors.get(f"S.{layer}")
            if s is not None:
                if tuple(s.shape) != (d, f) or s.dtype != spec.dtype:
                    raise StateFileError(f"S of layer {layer} has shape {tuple(s.shape)}, expected {(d, f)}")
                if not torch.isfinite(s).all():
                    raise StateFileError(f"S of layer {layer} holds non-finite values")
                state.S[layer] = s.to(spec.device)
        counters = json.loads(meta["counters"])
        state.tokens = tensors["tokens"].tolist()
        state.pending.load_tensors({k: v.to(spec.device) for k, v in tensors.items() if k.startswith("pending.")
                                    and k != "pending.positions"})
        state.pending.positions = tensors["pending.positions"].tolist()
        state.pending.chunk = int(counters["pending_chunk"])
        if "last_logits" in tensors:
            state.last_logits = tensors["last_logits"].to(spec.device)
        n_kv = sum(1 for k in tensors if k.startswith("kv.") and k.endswith(".k"))
        if n_kv:
            state.kv = [(tensors[f"kv.{i}.k"].to(spec.device), tensors[f"kv.{i}.v"].to(spec.device))
                        for i in range(n_kv)]
            state.kv_tokens = int(counters["kv_tokens"])
        state.writes, state.refused_writes = int(counters["writes"]), int(counters["refused_writes"])
        state.bump()
    except StateFileError:
        raise
    except (KeyError, ValueError, TypeError) as err:
        raise StateFileError(f"state file is incomplete or malformed: {err}") from None
    return state


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))


def load_state(path: str | Path, rt: Runtime) -> FastWeights:
    """Load a state file written by ``FastWeights.save`` into a new state for ``rt``."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise StateFileError(f"cannot read state file {path}: {err.strerror}") from None
    return state_from_bytes(data, rt)
