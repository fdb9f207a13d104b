"""One-pass prefill of layer-local rules (``adapt_runtime.one_pass``) against the segment path and token by token;
``rt.forward(..., logits="last")``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from core_testing import DEVICE, assert_close, tiny_model, tokens
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import adapt_runtime as ar
from adapt_runtime import one_pass
from adapt_runtime.rules import Write
from adapt_runtime.rules.inplace_ttt import InPlaceTTTRule


def ttt_checkpoint(folder: Path, chunk: int = 6) -> Path:
    model = tiny_model(layers=4)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(ttt_layers=[0, 2, 3], ttt_chunk=chunk, ttt_lr=0.5, ttt_target="hidden_states")
    (folder / "config.json").write_text(json.dumps(config))
    d = model.config.hidden_size
    torch.manual_seed(5)
    weights = {}
    for i in (0, 2, 3):
        weights[f"model.layers.{i}.mlp.ttt_conv.weight"] = torch.randn(d, 1, 5) * 0.3
        weights[f"model.layers.{i}.mlp.ttt_proj.weight"] = torch.randn(d, d) * 0.2
    save_file(weights, str(folder / "ttt.safetensors"))
    return folder


@pytest.fixture(scope="module")
def ttt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ttt_checkpoint(tmp_path_factory.mktemp("ttt"))


def ttt_runtime(folder: Path, **kwargs) -> ar.Runtime:
    model = AutoModelForCausalLM.from_pretrained(str(folder)).float().eval().to(DEVICE)
    return ar.patch(model, rule="inplace-ttt", **kwargs)


def hebbian_runtime(**kwargs) -> ar.Runtime:
    options = {"target": "output", "lr": 1.0, "chunk_size": 5, "layers": [1], **kwargs}
    return ar.patch(tiny_model(), rule="hebbian", **options)


def feed(rt: ar.Runtime, ids: torch.Tensor, state: ar.FastWeights, pieces: list[int], one: bool) -> torch.Tensor:
    """Logits of ``ids`` fed in ``pieces`` (lengths) with the one-pass path on or off."""
    rt.one_pass = one
    try:
        outs, pos = [], 0
        for n in pieces:
            outs.append(rt.forward(ids[pos : pos + n], state))
            pos += n
        return torch.cat(outs, dim=1)
    finally:
        rt.one_pass = True


def assert_same_state(a: ar.FastWeights, b: ar.FastWeights) -> None:
    assert (a.writes, a.refused_writes, a.tokens_seen, a.kv_len) == (b.writes, b.refused_writes, b.tokens_seen,
                                                                      b.kv_len)
    for layer in a.S:
        assert (a.S[layer] is None) == (b.S[layer] is None)
        if a.S[layer] is not None:
            assert_close(a.S[layer], b.S[layer], "state")
    assert a.pending.chunk == b.pending.chunk and a.pending.positions == b.pending.positions
    pa, pb = a.pending.tensors(), b.pending.tensors()
    assert pa.keys() == pb.keys()
    for key in pa:
        assert_close(pa[key], pb[key], "state")
    for (ka, va), (kb, vb) in zip(a.kv, b.kv):
        assert_close(ka, kb, "state")
        assert_close(va, vb, "state")


def counting(monkeypatch: pytest.MonkeyPatch, rt: ar.Runtime) -> list[int]:
    """The widths of the model calls ``rt`` makes from now on."""
    widths: list[int] = []
    call = rt._call_model

    def spy(ids, *args, **kwargs):
        widths.append(ids.shape[1])
        return call(ids, *args, **kwargs)

    monkeypatch.setattr(rt, "_call_model", spy)
    return widths


def test_segments_cut_at_chunk_boundaries() -> None:
    assert one_pass.segments(0, 10, 4) == [(0, 4, True), (4, 8, True), (8, 10, False)]
    assert one_pass.segments(3, 6, 4) == [(0, 1, True), (1, 5, True), (5, 6, False)]
    assert one_pass.segments(0, 8, 4) == [(0, 4, True), (4, 8, False)]  # the last chunk's label is not known
    assert one_pass.segments(1, 2, 4) == [(0, 2, False)]


def test_inplace_ttt_is_layer_local_and_error_targets_are_not() -> None:
    assert InPlaceTTTRule.layer_local
    assert not ar.patch(tiny_model(), rule="hebbian").rule.layer_local
    assert not ar.patch(tiny_model(), rule="gradient").rule.layer_local
    assert not hebbian_runtime(layers=[1, 2]).rule.layer_local  # the rate's key scale is shared by the layers
    assert not hebbian_runtime(modulation="surprise").rule.layer_local  # reads the logits
    assert hebbian_runtime().rule.layer_local
    assert hebbian_runtime(target="next_token", norm_jacobian=False).rule.layer_local
    assert not hebbian_runtime(target="next_token").rule.layer_local  # the final norm's scale


@pytest.mark.parametrize("rule", ["inplace-ttt", "hebbian-output", "hebbian-next-token"])
def test_one_pass_equals_segments_and_token_by_token(ttt_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                     rule: str) -> None:
    if rule == "inplace-ttt":
        rt = ttt_runtime(ttt_folder)
    else:
        rt = hebbian_runtime(**({"target": "next_token", "norm_jacobian": False} if rule.endswith("token") else {}))
    C = rt.config.chunk_size
    ids = tokens(5 * C + 3)
    widths = counting(monkeypatch, rt)
    one = rt.new_state()
    logits = feed(rt, ids, one, [len(ids)], True)
    assert widths == [len(ids)]  # one model call
    seg, tok = rt.new_state(), rt.new_state()
    assert_close(logits, feed(rt, ids, seg, [len(ids)], False), "logits")
    assert_close(logits, feed(rt, ids, tok, [1] * len(ids), False), "logits")
    assert one.writes == 5
    assert_same_state(one, seg)
    assert_same_state(one, tok)
    # and it goes on alike: more tokens after it, through either path
    more = tokens(2 * C + 1, seed=3)
    assert_close(feed(rt, more, one, [len(more)], True), feed(rt, more, seg, [1] * len(more), False), "logits")
    assert_same_state(one, seg)


@pytest.mark.parametrize("start", [1, 4, 6, 7])
def test_mid_chunk_starts(ttt_folder: Path, start: int) -> None:
    """A state whose pending chunk is partly filled (or complete, its write not yet fired) reads on in one pass."""
    rt = ttt_runtime(ttt_folder)
    ids = tokens(4 * rt.config.chunk_size + 2, seed=1)
    one, seg = rt.new_state(), rt.new_state()
    head = feed(rt, ids, one, [start], False)
    assert len(one.pending) == (start - 1) % 6 + 1
    logits = torch.cat([head, feed(rt, ids[start:], one, [len(ids) - start], True)], dim=1)
    assert_close(logits, feed(rt, ids, seg, [1] * len(ids), False), "logits")
    assert_same_state(one, seg)


def test_batched_rows_at_different_offsets(ttt_folder: Path) -> None:
    rt = ttt_runtime(ttt_folder)
    a, b = tokens(9, seed=4), tokens(3, seed=5)
    rows = [rt.new_state(), rt.new_state()]
    rt.forward(a, rows[0])
    rt.forward(b, rows[1])
    alone = [s.clone() for s in rows]
    ids = torch.stack([tokens(20, seed=6), tokens(20, seed=7)])
    logits = rt.forward(ids, rows)
    for r in range(2):
        expected = feed(rt, ids[r], alone[r], [1] * 20, False)
        assert_close(logits[r : r + 1], expected, "logits")
        assert_same_state(rows[r], alone[r])


def test_state_file_after_one_pass_equals_segments(ttt_folder: Path, tmp_path: Path) -> None:
    rt = ttt_runtime(ttt_folder)
    ids = tokens(3 * rt.config.chunk_size + 4, seed=2)
    one, seg = rt.new_state(), rt.new_state()
    feed(rt, ids, one, [len(ids)], True)
    feed(rt, ids, seg, [len(ids)], False)
    one.save(tmp_path / "one.safetensors")
    seg.save(tmp_path / "seg.safetensors")
    loaded = [ar.load_state(tmp_path / f"{name}.safetensors", rt) for name in ("one", "seg")]
    assert_same_state(*loaded)
    more = tokens(9, seed=8)
    assert_close(rt.forward(more, loaded[0]), rt.forward(more, loaded[1]), "logits")
    assert_same_state(*loaded)


@pytest.mark.parametrize("option", [{"clip": 0.01}, {"decay": 0.7}, {"norm_bound": 0.02},
                                    {"state_dtype": "bfloat16"}])
def test_options_act_as_in_the_segment_path(ttt_folder: Path, option: dict) -> None:
    rt = ttt_runtime(ttt_folder, **option)
    ids = tokens(4 * rt.config.chunk_size + 1, seed=9)
    one, seg = rt.new_state(), rt.new_state()
    logits = feed(rt, ids, one, [len(ids)], True)
    kind = "bfloat16-state" if "state_dtype" in option else "logits"
    assert_close(logits, feed(rt, ids, seg, [len(ids)], False), kind)
    for layer in one.S:
        assert_close(one.S[layer].float(), seg.S[layer].float(), "bfloat16-state" if kind != "logits" else "state")
    assert one.writes == seg.writes == 4


def test_a_refused_write_falls_back_to_the_segment_path(ttt_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-finite write in one layer refuses the chunk's write in every layer, which one pass cannot know below
    that layer: the pass is dropped (KV put back) and the segment path reads the span."""
    rt = ttt_runtime(ttt_folder)
    rule = rt.rule
    write = type(rule).write

    def poisoned(self, chunk):  # the marked chunk's write of layer 3 overflows
        marked = bool((chunk.tokens == 50).all())
        return [Write(w.layer, w.V * (math.inf if w.layer == 3 and marked else 1.0), w.X, w.beta)
                for w in write(self, chunk)]

    C = rt.config.chunk_size
    ids = tokens(4 * C + 2, seed=11)
    ids[C : 2 * C] = 50  # chunk 1
    monkeypatch.setattr(type(rule), "write", poisoned)
    monkeypatch.setattr(type(rule), "write_layer", lambda self, chunks: [self.write(c) for c in chunks])
    widths = counting(monkeypatch, rt)
    one, seg = rt.new_state(), rt.new_state()
    logits = feed(rt, ids, one, [len(ids)], True)
    assert widths[0] == len(ids) and len(widths) > 1  # the pass, then the segments
    assert one.refused_writes == 1 and one.writes == 3
    assert_close(logits, feed(rt, ids, seg, [1] * len(ids), False), "logits")
    assert_same_state(one, seg)


def test_step_options_fall_back(ttt_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = ttt_runtime(ttt_folder)
    rule = rt.rule

    class Steps:
        plain = False

    def stepped(chunks):
        return [[Write(w.layer, w.V, w.X, w.beta) for w in ws] for ws in type(rule).write_layer(rule, chunks)]

    monkeypatch.setattr(rule, "write_layer", lambda chunks: [[_with_steps(w, Steps()) for w in ws]
                                                             for ws in stepped(chunks)])
    plan_ok = one_pass.OnePass._write
    seen = []

    def spy(self, i, S, slot, writes):
        seen.append(plan_ok(self, i, S, slot, writes))
        return seen[-1]

    monkeypatch.setattr(one_pass.OnePass, "_write", spy)
    widths = counting(monkeypatch, rt)
    feed(rt, tokens(2 * rt.config.chunk_size + 1), rt.new_state(), [2 * rt.config.chunk_size + 1], True)
    assert seen == [False] and len(widths) > 1


def _with_steps(w: Write, steps: object) -> Write:
    w.steps = steps  # type: ignore[attr-defined]
    return w


def test_gradient_and_error_rules_keep_the_segment_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for rule in ("gradient", "hebbian"):
        rt = ar.patch(tiny_model(), rule=rule, chunk_size=5)
        widths = counting(monkeypatch, rt)
        rt.forward(tokens(12), rt.new_state())
        assert widths == [5, 5, 2]


# ---------------------------------------------------------------------------------------- kernels.chunk_scan
def scans(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per ``kernels.chunk_scan`` call of a one-pass layer from now on: whether ``W0`` was folded in."""
    calls: list[bool] = []
    scan = one_pass.kernels.chunk_scan

    def spy(*args, **kwargs):
        calls.append(args[11] is not None)
        return scan(*args, **kwargs)

    monkeypatch.setattr(one_pass.kernels, "chunk_scan", spy)
    return calls


@pytest.mark.parametrize("case", ["inplace-ttt", "hooked-down", "hebbian-next-token", "hebbian-output",
                                  "norm-bound", "bfloat16-state"])
def test_chunk_scan_where_every_write_is_known_first(ttt_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                     case: str) -> None:
    """Rows whose chunk writes are all known before the span is applied run as one ``chunk_scan`` per layer (with
    ``W0`` folded in unless the down projection has a forward of its own), with the segment path's logits and
    state; targets that read ``y``, the norm bound and a bfloat16 state keep the piece-by-piece path."""
    hebbian = {"hebbian-next-token": {"target": "next_token", "norm_jacobian": False, "norm_bound": 0},
               "hebbian-output": {}}
    if case in hebbian:
        rt = hebbian_runtime(**hebbian[case])
    else:
        rt = ttt_runtime(ttt_folder, **{"norm-bound": {"norm_bound": 0.02},
                                        "bfloat16-state": {"state_dtype": "bfloat16"}}.get(case, {}))
    if case == "hooked-down":
        for wrapper in rt.plastic.values():
            wrapper.base.register_forward_hook(lambda module, args, out: None)
    C = rt.config.chunk_size
    ids = tokens(3 * C + 2, seed=14)
    calls = scans(monkeypatch)
    one, seg = rt.new_state(), rt.new_state()
    logits = feed(rt, ids, one, [len(ids)], True)
    expected = {"inplace-ttt": [True] * 3, "hooked-down": [False] * 3, "hebbian-next-token": [True]}
    assert calls == expected.get(case, [])
    kind = "bfloat16-state" if case == "bfloat16-state" else "logits"
    assert_close(logits, feed(rt, ids, seg, [len(ids)], False), kind)
    if kind == "logits":
        assert_same_state(one, seg)


@pytest.mark.parametrize("start", [4, 6])
def test_chunk_scan_takes_the_pending_keys(ttt_folder: Path, monkeypatch: pytest.MonkeyPatch, start: int) -> None:
    """A span that completes the state's pending chunk: its first write's keys are the pending rows and the span's
    first piece, packed for the scan."""
    rt = ttt_runtime(ttt_folder)
    ids = tokens(3 * rt.config.chunk_size + 1, seed=15)
    one, seg = rt.new_state(), rt.new_state()
    head = feed(rt, ids, one, [start], False)
    calls = scans(monkeypatch)
    logits = torch.cat([head, feed(rt, ids[start:], one, [len(ids) - start], True)], dim=1)
    assert calls == [True] * 3
    assert_close(logits, feed(rt, ids, seg, [1] * len(ids), False), "logits")
    assert_same_state(one, seg)


def test_keys_of_packs_views_without_a_copy() -> None:
    x = torch.randn(10, 3)
    writes = [Write(0, torch.randn(4, 2), x[0:4], torch.ones(4)), Write(0, torch.randn(4, 2), x[4:8], torch.ones(4))]
    assert one_pass.keys_of(writes, x, [(0, 4), (4, 8)]).data_ptr() == x.data_ptr()
    other = [writes[0], Write(0, torch.randn(4, 2), x[4:8].clone(), torch.ones(4))]
    packed = one_pass.keys_of(other, x, [(0, 4), (4, 8)])
    assert packed.data_ptr() != x.data_ptr() and torch.equal(packed, x[:8])


def test_fits_float32_is_the_write_bound_with_a_margin() -> None:
    from adapt_runtime.write import OVERFLOW_GUARD, write_bound

    V, X, beta = torch.randn(6, 4), torch.randn(6, 5), torch.rand(6)
    assert bool(one_pass.fits_float32(V, X, beta))
    for scale in (OVERFLOW_GUARD / 10, math.inf, math.nan):
        big = X.clone()
        big[2, 1] = scale
        assert not bool(one_pass.fits_float32(V, big, beta))
        if math.isfinite(scale):  # refused here, while the exact bound would still take it
            assert bool(write_bound(Write(0, V, big, beta)) <= OVERFLOW_GUARD)


# ---------------------------------------------------------------------------------------------- logits="last"
@pytest.mark.parametrize("rule", ["inplace-ttt", "hebbian", "hebbian-output", "none", "gradient"])
def test_last_logits_equal_the_full_forwards_last_row(ttt_folder: Path, rule: str) -> None:
    if rule == "inplace-ttt":
        rt = ttt_runtime(ttt_folder)
    elif rule == "hebbian-output":
        rt = hebbian_runtime()
    else:
        rt = ar.patch(tiny_model(), rule=rule, chunk_size=5)
    ids = tokens(17, seed=12)
    full, last = rt.new_state(), rt.new_state()
    expected = rt.forward(ids, full)
    got = rt.forward(ids, last, logits="last")
    assert got.shape == (1, 1, expected.shape[-1])
    assert_close(got[0, -1], expected[0, -1], "logits")
    assert_close(last.last_logits, full.last_logits, "logits")
    assert_same_state(last, full)
    more = tokens(4, seed=13)
    assert_close(rt.forward(more, last, logits="last")[0, -1], rt.forward(more, full)[0, -1], "logits")
    assert_close(rt.forward(more, last, adapt=False, logits="last")[0, -1],
                 rt.forward(more, full, adapt=False)[0, -1], "logits")
    assert_same_state(last, full)


def test_last_logits_run_the_unembedding_on_one_position(ttt_folder: Path) -> None:
    rt = ttt_runtime(ttt_folder)
    rows = []
    hook = rt.model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    try:
        rt.forward(tokens(20), rt.new_state(), logits="last")
        rt.one_pass = False
        rt.forward(tokens(20), rt.new_state(), logits="last")
    finally:
        hook.remove()
    assert rows == [1, 1, 1, 1, 1]


def test_logits_option_is_checked() -> None:
    rt = ar.patch(tiny_model(), rule="none")
    with pytest.raises(ValueError, match="logits"):
        rt.forward(tokens(3), rt.new_state(), logits="first")
