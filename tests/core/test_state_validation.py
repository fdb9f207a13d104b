"""Every tensor and counter of a state file is checked on load: forged or damaged files are refused with a
``MalformedStateError`` (the server's 400), files of another rule configuration with an ``IncompatibleStateError``
(409), and legitimate files of every state shape still load."""

from __future__ import annotations

import json

import pytest
import torch
from core_testing import patched, tokens
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import adapt_runtime as ar
from adapt_runtime.state_file import file_metadata
from adapt_runtime.state_validation import header_metadata

CHUNK = 6


@pytest.fixture(scope="module")
def rt() -> ar.Runtime:
    return patched("hebbian", chunk_size=CHUNK)


@pytest.fixture(scope="module")
def good(rt) -> bytes:
    state = rt.new_state()
    rt.forward(tokens(20), state)  # mid-chunk: pending rows, targets, last_logits and a KV cache are all saved
    return state.to_bytes()


def forge(data: bytes, edit) -> bytes:
    """``data`` with ``edit(tensors, meta, counters)`` applied (edit mutates the three dicts)."""
    tensors, meta = dict(st_load(data)), header_metadata(data)
    counters = json.loads(meta["counters"])
    edit(tensors, meta, counters)
    meta["counters"] = json.dumps(counters)
    return st_save(tensors, metadata=meta)


def _set(key, fn):
    def edit(t, m, c):
        t[key] = fn(t[key])
    return edit


def _nan_at_end(x):
    x = x.clone()
    x.view(-1)[-1] = float("nan")
    return x


def _long_kv(t, m, c):
    """A KV cache longer than the model's 256 positions, with a stream and counter to match."""
    n = 300
    t["tokens"] = torch.arange(n, dtype=torch.int64) % 90 + 3
    for key in [k for k in t if k.startswith("kv.")]:
        reps = -(-n // t[key].shape[2])
        t[key] = t[key].repeat(1, 1, reps, 1)[:, :, :n].contiguous()
    c["kv_tokens"] = n
    t["pending.positions"] = torch.arange(298, 300, dtype=torch.int64)
    c["pending_chunk"] = 298 // CHUNK
    for key in [k for k in t if k.startswith("pending.") and k != "pending.positions"]:
        t[key] = t[key][-2:].contiguous()


def _as_rows(t, name):
    """``pending.target.<name>`` (one value per position) made `[m, d]`, the shape of a ``v`` target."""
    key = f"pending.target.{name}"
    t[key] = t[key][:, None].repeat(1, t["pending.target.v"].shape[1]).contiguous()


MALFORMED = {
    "huge-S": _set("S.0", lambda s: torch.full_like(s, 3e38)),
    "S-above-bound": _set("S.1", lambda s: s + 2e5),
    "S-wrong-dtype": _set("S.0", lambda s: s.double()),
    "nan-last-logits": _set("last_logits", _nan_at_end),
    "last-logits-wrong-size": _set("last_logits", lambda x: x[:-1].contiguous()),
    "nan-kv": _set("kv.1.v", _nan_at_end),
    "huge-kv": _set("kv.0.k", lambda x: x * 1e30),
    "kv-wrong-dtype": _set("kv.0.k", lambda x: x.double()),
    "kv-wrong-heads": _set("kv.2.k", lambda x: x[:, :1].contiguous()),
    "kv-layer-missing": lambda t, m, c: (t.pop("kv.2.k"), t.pop("kv.2.v")),
    "kv-longer-than-counter": lambda t, m, c: c.update(kv_tokens=c["kv_tokens"] - 3),
    "kv-longer-than-stream": lambda t, m, c: t.update(tokens=t["tokens"][:10].contiguous()),
    "kv-longer-than-model": _long_kv,
    "kv-counter-without-cache": lambda t, m, c: [t.pop(k) for k in [k for k in t if k.startswith("kv.")]],
    "token-above-vocab": _set("tokens", lambda x: torch.cat([x[:-1], torch.tensor([97])])),
    "negative-token": _set("tokens", lambda x: torch.cat([x[:-1], torch.tensor([-1])])),
    "tokens-as-float": _set("tokens", lambda x: x.float()),
    "negative-writes": lambda t, m, c: c.update(writes=-1),
    "negative-refused": lambda t, m, c: c.update(refused_writes=-5),
    "counter-not-int": lambda t, m, c: c.update(writes="3"),
    "counter-missing": lambda t, m, c: c.pop("pending_chunk"),
    "pending-rows-wrong-shape": _set("pending.x.0", lambda x: x[:, :-1].contiguous()),
    "pending-rows-short": _set("pending.x.1", lambda x: x[:-1].contiguous()),
    "pending-rows-nan": _set("pending.x.2", _nan_at_end),
    "pending-rows-missing": lambda t, m, c: t.pop("pending.x.0"),
    "pending-target-too-long": _set("pending.target.nll", lambda x: torch.cat([x, x, x])),
    "pending-target-nan": _set("pending.target.v", _nan_at_end),
    "pending-outside-chunk": _set("pending.positions", lambda p: p - CHUNK),
    "pending-chunk-negative": lambda t, m, c: c.update(pending_chunk=-1),
    "pending-rows-not-captured": lambda t, m, c: t.update({"pending.y.0": t["pending.x.0"][:, :32].contiguous()}),
    "unknown-tensor": lambda t, m, c: t.update(extra=torch.zeros(2)),
    "S-of-unknown-layer": lambda t, m, c: t.update({"S.7": t["S.0"].clone()}),
    "last-logits-without-tokens": lambda t, m, c: (
        t.update(tokens=torch.zeros(0, dtype=torch.int64), **{"pending.positions": torch.zeros(0, dtype=torch.int64)}),
        c.update(kv_tokens=0, pending_chunk=-1),
        [t.pop(k) for k in [k for k in t if k.startswith(("kv.", "pending.")) and k != "pending.positions"]]),
    "no-format": lambda t, m, c: m.pop("format"),
    # issue 17, item 4: pending targets checked by name, shape and against each other
    "pending-target-v-1d": _set("pending.target.v", lambda v: v[:, 0].contiguous()),
    "pending-target-v-fewer-rows-than-nll": _set("pending.target.v", lambda v: v[:-1].contiguous()),
    "pending-target-nll-2d": lambda t, m, c: _as_rows(t, "nll"),
    "pending-target-inv-rms-2d": lambda t, m, c: _as_rows(t, "inv_rms"),
    "pending-target-inv-rms-short": _set("pending.target.inv_rms", lambda x: x[:-1].contiguous()),
    "pending-target-inv-rms-missing": lambda t, m, c: t.pop("pending.target.inv_rms"),
    "pending-target-v-missing": lambda t, m, c: t.pop("pending.target.v"),
    "pending-target-unknown": lambda t, m, c: t.update({"pending.target.w": t["pending.target.nll"].clone()}),
    # issue 17, item 10: lying metadata and counters out of any sane range
    "shapes-lie": lambda t, m, c: m.update(shapes=json.dumps([[64, 96]] * 3)),
    "shapes-missing": lambda t, m, c: m.pop("shapes"),
    "refused-writes-1e30": lambda t, m, c: c.update(refused_writes=10**30),
    "refused-writes-float-1e30": lambda t, m, c: c.update(refused_writes=1e30),
    "writes-above-completed-chunks": lambda t, m, c: c.update(writes=c["writes"] + 1),
    "kv-tokens-huge": lambda t, m, c: c.update(kv_tokens=10**30),
    "unknown-counter": lambda t, m, c: c.update(sneaky=1),
    "tokens-offset-negative": lambda t, m, c: c.update(tokens_offset=-1),
    "tokens-offset-past-pending": lambda t, m, c: c.update(tokens_offset=19),
}


def test_the_unforged_file_loads(rt, good):
    assert forge(good, lambda t, m, c: None) != b""
    state = ar.state_from_bytes(forge(good, lambda t, m, c: None), rt)
    assert state.tokens_seen == 20 and state.kv_len == 20 and len(state.pending) == 20 % CHUNK


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_state_is_refused(rt, good, case):
    data = forge(good, MALFORMED[case])
    with pytest.raises(ar.MalformedStateError):
        ar.state_from_bytes(data, rt)


def test_a_state_at_the_models_length_still_loads():
    rt = patched("hebbian", chunk_size=CHUNK)
    state = rt.new_state()
    rt.forward(tokens(rt.max_length), state)
    assert ar.state_from_bytes(state.to_bytes(), rt).kv_len == rt.max_length


@pytest.mark.parametrize("option", ["target", "norm_jacobian", "modulation", "topk"])
def test_other_rule_options_are_incompatible(good, option):
    value = {"target": "output", "norm_jacobian": False, "modulation": "surprise", "topk": 5}[option]
    # the same step options as the good state's runtime (hebbian's delta default is taken by its error target only)
    steps = {"write_form": "delta", "erase": 0.2}
    other = patched("hebbian", chunk_size=CHUNK, **steps, **{option: value})
    with pytest.raises(ar.IncompatibleStateError, match=f"rule option '{option}'"):
        ar.state_from_bytes(good, other)


def test_forged_options_and_versions_are_incompatible(rt, good):
    def options(t, m, c):
        config = json.loads(m["config"])
        config["options"]["target"] = "output"
        m["config"] = json.dumps(config)

    with pytest.raises(ar.IncompatibleStateError, match="'target'"):
        ar.state_from_bytes(forge(good, options), rt)
    with pytest.raises(ar.IncompatibleStateError, match="version"):
        ar.state_from_bytes(forge(good, lambda t, m, c: m.update(format_version="2")), rt)


def test_the_errors_are_state_file_errors_and_distinct():
    assert issubclass(ar.MalformedStateError, ar.StateFileError)
    assert issubclass(ar.IncompatibleStateError, ar.StateFileError)
    assert not issubclass(ar.MalformedStateError, ar.IncompatibleStateError)
    with pytest.raises(ar.MalformedStateError):
        ar.state_from_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!" + b"x" * 8, patched("none"))


def test_extra_metadata_rides_in_the_header_and_is_ignored_on_load(rt, good, tmp_path):
    state = ar.state_from_bytes(good, rt)
    path = tmp_path / "s.safetensors"
    path.write_bytes(state.to_bytes(extra_metadata={"session": '{"id": "alice"}'}))
    assert file_metadata(path)["session"] == '{"id": "alice"}'
    assert ar.load_state(path, rt).tokens == state.tokens
    with pytest.raises(ValueError, match="may not replace"):
        state.to_bytes(extra_metadata={"rule": "gradient"})


def _stream_past_the_pending_chunk(n: int):
    """Issue 17, item 1: the stream replaced by ``n`` valid ids, KV dropped, the pending chunk left as it was."""
    def edit(t, m, c):
        t["tokens"] = torch.arange(n, dtype=torch.int64) % 90 + 3
        for key in [k for k in t if k.startswith("kv.")]:
            del t[key]
        c["kv_tokens"] = 0
    return edit


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_a_pending_chunk_behind_its_stream_is_refused(rule) -> None:
    """A forged stream that runs past the pending chunk would have the gradient rule recompute all of it."""
    rt = patched(rule, chunk_size=CHUNK)
    state = rt.new_state()
    rt.forward(tokens(7), state)  # pending chunk 1: position 6
    data = state.to_bytes()
    with pytest.raises(ar.MalformedStateError, match="not the stream's current chunk"):
        ar.state_from_bytes(forge(data, _stream_past_the_pending_chunk(16_000)), rt)
    assert ar.state_from_bytes(forge(data, _stream_past_the_pending_chunk(7)), rt).tokens_seen == 7


def _prepend(n: int):
    """A legitimate-looking older history: ``n`` (a multiple of the chunk) tokens before the stream."""
    def edit(t, m, c):
        t["tokens"] = torch.cat([torch.arange(n, dtype=torch.int64) % 90 + 3, t["tokens"]])
        t["pending.positions"] = t["pending.positions"] + n
        c["pending_chunk"] += n // CHUNK
    return edit


def test_a_long_stream_is_compacted_on_import_and_continues_identically(rt, good) -> None:
    """Issue 17, item 2: a state keeps the tokens its KV cache and pending chunk cover; chunks stay absolute."""
    n = 6 * 20_000
    short, long = ar.state_from_bytes(good, rt), ar.state_from_bytes(forge(good, _prepend(n)), rt)
    assert long.tokens_seen == short.tokens_seen + n and long.tokens == short.tokens
    assert long.tokens_offset == n and long.nbytes == short.nbytes
    nxt = tokens(15, seed=4)
    torch.testing.assert_close(rt.forward(nxt, long), rt.forward(nxt, short), atol=0, rtol=0)
    for layer in rt.state_spec.layers:
        torch.testing.assert_close(long.S[layer], short.S[layer], atol=0, rtol=0)
    again = ar.state_from_bytes(long.to_bytes(), rt)  # the offset rides in the file
    assert again.tokens_seen == long.tokens_seen and again.tokens == long.tokens


def test_nbytes_counts_the_stream(rt) -> None:
    from adapt_runtime.state import POSITION_BYTES

    state = rt.new_state()
    rt.forward(tokens(20), state)
    before = state.nbytes
    rt.forward(tokens(10, seed=1), state)
    held = sum(t.numel() * t.element_size() for pair in state.kv for t in pair)
    assert state.nbytes >= held + POSITION_BYTES * len(state.tokens)
    assert state.nbytes > before


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_the_stream_held_is_bounded_by_the_kv_cache_and_the_pending_chunk(rule) -> None:
    """Reading windows drops the KV before each: the tokens kept are one window and one chunk at most."""
    rt = patched(rule, chunk_size=CHUNK)
    state = rt.new_state()
    rt.read(tokens(400, seed=3), state, window=40)
    assert state.tokens_seen == 400 and state.kv_len <= 40
    assert len(state.tokens) <= state.kv_len + CHUNK
    state.drop_kv()
    assert len(state.tokens) <= CHUNK and state.tokens_seen == 400


def test_a_recompute_reads_one_chunk_at_most() -> None:
    """Issue 17, item 1: the gradient rule recomputes the pending chunk alone, never the stream after it."""
    C = 8
    rt = patched("gradient", chunk_size=C)
    state = rt.new_state()
    rt.forward(tokens(7), state)  # pending: positions 0..6 of chunk 0
    rt.forward(tokens(100, seed=1), state, adapt=False)  # the stream moves on without writing
    lengths, call = [], rt._call

    def spy(ids, *args):
        lengths.append(ids.shape[1])
        return call(ids, *args)

    rt._call = spy
    rt.forward(tokens(1, seed=2), state)  # the write of chunk 0 fires: recompute, then the token itself
    assert state.writes == 1 and max(lengths) <= C, lengths


def test_a_header_nested_past_the_recursion_limit_is_malformed():
    header = b'{"__metadata__": {"a": "b"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    data = len(header).to_bytes(8, "little") + header
    with pytest.raises(ar.MalformedStateError, match="nested"):
        header_metadata(data)
