"""State files: safetensors with metadata, written atomically, checked against the runtime on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapt_runtime.atomic import atomic_write
from adapt_runtime.errors import IncompatibleStateError, MalformedStateError, StateFileError
from adapt_runtime.state import FastWeights, retained_start
from adapt_runtime.state_validation import (
    EXTRA_TENSORS,
    check_compatible,
    check_tensors,
    header_metadata,
    read_counters,
)

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime

FORMAT = "adapt-runtime-state"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header


def state_to_bytes(state: FastWeights, include_kv: bool = True, extra_metadata: dict[str, str] | None = None) -> bytes:
    """The state as safetensors bytes; ``extra_metadata`` (e.g. a server's session record) rides in the header,
    so it is written in the same atomic write as the tensors (loading ignores it)."""
    spec = state.spec
    tensors = {f"S.{k}": s.contiguous() for k, s in state.S.items() if s is not None}
    tensors.update({f"{name}.{k}": t.contiguous() for name, part in state.extra.items() for k, t in part.items()})
    for k, (b, a) in state.factors.items():  # a rank-r runtime's S = B A, factors as held (rank k <= r)
        tensors[f"B.{k}"], tensors[f"A.{k}"] = b.contiguous(), a.contiguous()
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
             "kv_tokens": state.kv_len if include_kv else 0, "tokens_offset": state.tokens_offset}
        ),
    }
    if spec.state_rank is not None:  # dense files stay as they were before the option existed
        metadata["state_rank"] = str(spec.state_rank)
    clash = set(extra_metadata or {}) & set(metadata)
    if clash:
        raise ValueError(f"extra metadata may not replace the state's own keys {sorted(clash)}")
    metadata.update(extra_metadata or {})
    return st_save({k: v.detach().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_state(state: FastWeights, path: str | Path, include_kv: bool = True) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then rename."""
    atomic_write(path, state_to_bytes(state, include_kv=include_kv))


def state_from_bytes(data: bytes, rt: Runtime) -> FastWeights:
    """Rebuild a state from ``state_to_bytes`` output, after checking every tensor and counter against ``rt``
    (see ``adapt_runtime.state_validation``). Raises ``IncompatibleStateError`` for a file of another model, rule
    or format and ``MalformedStateError`` for anything else wrong (both are ``StateFileError``)."""
    meta = header_metadata(data)
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises several types for damaged bytes
        raise MalformedStateError(f"state file is corrupt or not a safetensors file: {err}") from None
    if meta.get("format") != FORMAT:
        raise MalformedStateError("not an adapt-runtime state file (missing format metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise IncompatibleStateError(f"unsupported state format version {meta.get('format_version')!r}")
    spec = rt.state_spec
    check_compatible(meta, spec)
    counters = read_counters(meta)
    check_tensors(tensors, counters, rt)
    state = rt.new_state()
    for layer in spec.layers:
        if f"S.{layer}" in tensors:
            state.S[layer] = tensors[f"S.{layer}"].to(spec.device)
        for name in EXTRA_TENSORS:  # the steps' own state (momentum, slow part), checked as S
            if f"{name}.{layer}" in tensors:
                state.extra.setdefault(name, {})[layer] = tensors[f"{name}.{layer}"].to(spec.device)
        if f"B.{layer}" in tensors:
            state.factors[layer] = (tensors[f"B.{layer}"].to(spec.device), tensors[f"A.{layer}"].to(spec.device))
    state.pending.load_tensors({k: v.to(spec.device) for k, v in tensors.items() if k.startswith("pending.")
                                and k != "pending.positions"})
    state.pending.positions = tensors["pending.positions"].tolist()
    state.pending.chunk = counters["pending_chunk"]
    if "last_logits" in tensors:
        state.last_logits = tensors["last_logits"].to(spec.device)
    n_kv = sum(1 for k in tensors if k.startswith("kv.") and k.endswith(".k"))
    if n_kv:
        state.kv = [(tensors[f"kv.{i}.k"].to(spec.device), tensors[f"kv.{i}.v"].to(spec.device))
                    for i in range(n_kv)]
        state.kv_tokens = counters["kv_tokens"]
    # the stream's tail that the KV cache and the pending chunk read (a file may hold more: older files hold every
    # token); the rest is not kept, so a session's memory is what ``nbytes`` counts (see ``FastWeights.compact``)
    tokens, offset = tensors["tokens"], counters["tokens_offset"]
    start = max(offset, retained_start(offset + tokens.numel(), state.kv_len, state.pending, spec.chunk_size))
    state.tokens, state.tokens_offset = tokens[start - offset :].tolist(), start
    state.writes, state.refused_writes = counters["writes"], counters["refused_writes"]
    state.bump()
    return state


def file_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a state file, read from its header alone (the tensors are not read)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < size <= MAX_HEADER_BYTES:
            raise MalformedStateError(f"{path} is not a safetensors file (header length {size})")
        return header_metadata(head + handle.read(size))


def load_state(path: str | Path, rt: Runtime) -> FastWeights:
    """Load a state file written by ``FastWeights.save`` into a new state for ``rt``."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise StateFileError(f"cannot read state file {path}: {err.strerror}") from None
    return state_from_bytes(data, rt)
