"""``chunk_scan`` against its naive twin and against the apply/write loop it replaces: a span of one slot cut at
chunk boundaries (from a chunk's start or mid-chunk, with pending keys in the first write), decay, beta, the clip,
the static ``base``, refused chunks."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from adapt_runtime.kernels import apply, chunk_scan, write
from adapt_runtime.kernels.naive import chunk_scan_naive
from kernel_testing import DEVICE, GPU_RATIO, RATIO, TORCH_RATIO, assert_close, needs_device, state
from torch import Tensor

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


class Span(NamedTuple):
    """T rows of one slot from stream position ``start``, chunks of C; S is [3, d, f]; activations dtype; ``fire_last``:
    the last piece's chunk is written too when it is complete (its next token was in the span)."""

    T: int
    d: int
    f: int
    C: int
    start: int
    dtype: torch.dtype
    fire_last: bool = False


def span_params(cases: list[Span]) -> list:
    return [pytest.param(c, id="T{}-d{}-f{}-C{}-start{}-{}{}".format(*c[:5], str(c.dtype)[6:],
                                                                        "-fire_last" if c.fire_last else ""))
            for c in cases]


CPU_CASES = [
    Span(40, 40, 72, 16, 0, f32),  # 16 + 16 + 8: two writes, a trailing partial piece
    Span(48, 40, 72, 16, 0, f16, fire_last=True),  # three complete chunks, all written
    Span(45, 24, 136, 16, 5, f32),  # mid-chunk start: the first write has 5 pending keys before its 11 rows
    Span(33, 40, 72, 32, 0, bf16),
    Span(7, 40, 72, 16, 3, f32),  # no chunk completes: apply only, no write
]
GPU_CASES = [
    Span(2048, 512, 1536, 256, 0, f32),
    Span(2048, 512, 1536, 256, 100, bf16, fire_last=True),
    Span(1000, 2048, 8192, 128, 0, bf16),
    Span(300, 300, 700, 64, 17, f16),
]


class Inputs(NamedTuple):
    y: Tensor
    x: Tensor
    S: Tensor
    offsets: Tensor
    V: Tensor
    X: Tensor
    write_offsets: Tensor
    beta: Tensor
    base: Tensor


def inputs(case: Span, state_dtype: torch.dtype = f32, device: str = "cpu") -> Inputs:
    """Pieces cut at the chunk boundaries of the stream; write k's keys are piece k's rows (the first write's
    preceded by ``start % C`` pending keys), its targets random."""
    T, d, f, C, start, dtype, fire_last = case
    torch.manual_seed(0)
    bounds, p = [0], 0
    while p < T:
        p = min(T, ((start + p) // C + 1) * C - start)
        bounds.append(p)
    complete = [(start + e) % C == 0 for e in bounds[1:]]
    fires = [c and (e < T or fire_last) for c, e in zip(complete, bounds[1:])]
    J = sum(fires)  # the firing pieces are a prefix of the pieces
    assert fires == [True] * J + [False] * (len(fires) - J)
    x = torch.randn(T, f, device=device).to(dtype)
    pending = torch.randn(start % C, f, device=device).to(dtype)
    X = torch.cat([pending, x[: bounds[J]]]) if J else x[:0]
    M = X.shape[0]
    write_bounds = [0] + [b + pending.shape[0] for b in bounds[1 : J + 1]]
    S = state(2, d, f, state_dtype, device)  # slot 1 is the span's; slot 0 must stay; slot 2 is NaN
    return Inputs(y=torch.randn(T, d, device=device).to(dtype), x=x, S=S,
                  offsets=torch.tensor(bounds, device=device), V=torch.randn(M, d, device=device).to(dtype), X=X,
                  write_offsets=torch.tensor(write_bounds, device=device), beta=torch.rand(M, device=device),
                  base=torch.randn(d, f, device=device).to(dtype) / f**0.5)


def unclipped(inp: Inputs, decay: float) -> Tensor:
    """The naive twin's norms without a clip (to pick a bound that clips some chunks and not others)."""
    return chunk_scan_naive(inp.y.clone(), inp.x, inp.S.clone(), 1, inp.offsets, inp.V, inp.X, inp.write_offsets,
                            inp.beta, decay)


def run(case: Span, impl: str, ratio: float, state_dtype: torch.dtype = f32, device: str = "cpu",
        with_base: bool = True, clip: bool = True) -> None:
    inp = inputs(case, state_dtype, device)
    decay = 0.9
    norms = unclipped(inp, decay)
    max_norm = float(norms.median()) if clip and norms.numel() else None  # clips the larger half
    base = inp.base if with_base else None
    y_ref, S_ref = inp.y.clone(), inp.S.clone()
    y_out, S_out = inp.y.clone(), inp.S.clone()
    args = (inp.offsets, inp.V, inp.X, inp.write_offsets, inp.beta, decay, max_norm, base)
    ref = chunk_scan_naive(y_ref, inp.x, S_ref, 1, *args)
    out = chunk_scan(y_out, inp.x, S_out, 1, *args, impl=impl)
    assert_close("norms", ref, out, ratio)
    assert_close("y", y_ref, y_out, ratio)
    assert_close("S", S_ref, S_out, ratio)
    assert torch.equal(S_out[0], inp.S[0]) and S_out[2].isnan().all(), "a slot outside the span changed"


@pytest.mark.parametrize("case", span_params(CPU_CASES))
@pytest.mark.parametrize("with_base", [False, True], ids=["no_base", "base"])
def test_chunk_scan_triton(case: Span, with_base: bool, interpreter: None) -> None:
    run(case, "triton", RATIO[case.dtype], with_base=with_base)


@pytest.mark.parametrize("case", span_params(CPU_CASES))
@pytest.mark.parametrize("with_base", [False, True], ids=["no_base", "base"])
def test_chunk_scan_torch(case: Span, with_base: bool) -> None:
    needs_device()
    run(case, "torch", TORCH_RATIO[case.dtype], device=DEVICE, with_base=with_base)


def test_chunk_scan_triton_bf16_state(interpreter: None) -> None:
    run(Span(40, 40, 72, 16, 0, f32), "triton", 1e-2, state_dtype=bf16)


def test_chunk_scan_torch_bf16_state() -> None:
    run(Span(40, 40, 72, 16, 0, f32), "torch", 1e-2, state_dtype=bf16)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_scan_is_the_apply_write_loop(impl: str, request: pytest.FixtureRequest) -> None:
    """The op equals what ``adapt_runtime.one_pass`` did chunk by chunk: ``apply`` each piece, ``write`` its chunk
    (and, with ``base``, the static product added first)."""
    if impl == "triton":
        request.getfixturevalue("interpreter")
    case = Span(45, 24, 136, 16, 5, f32)
    inp = inputs(case)
    decay = 0.9
    max_norm = float(unclipped(inp, decay).median())
    y_loop, S_loop = inp.y.clone() + inp.x @ inp.base.T, inp.S.clone()
    bounds, wbounds = inp.offsets.tolist(), inp.write_offsets.tolist()
    slot = torch.tensor([1])
    loop_norms = []
    for k in range(len(bounds) - 1):
        a, e = bounds[k], bounds[k + 1]
        apply(y_loop[a:e], inp.x[a:e], S_loop, slot, torch.tensor([0, e - a]), impl="torch")
        if k < len(wbounds) - 1:
            p, q = wbounds[k], wbounds[k + 1]
            bound = torch.tensor([max_norm])
            loop_norms.append(write(S_loop, slot, inp.V[None, p:q], inp.X[None, p:q], inp.beta[None, p:q], decay,
                                    bound, impl="torch"))
    y_out, S_out = inp.y.clone(), inp.S.clone()
    norms = chunk_scan(y_out, inp.x, S_out, 1, inp.offsets, inp.V, inp.X, inp.write_offsets, inp.beta, decay,
                       max_norm, inp.base, impl=impl)
    assert_close("norms", torch.cat(loop_norms), norms, RATIO[f32])
    assert_close("y", y_loop, y_out, RATIO[f32])
    assert_close("S", S_loop, S_out, RATIO[f32])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_scan_refuses_non_finite_chunks(impl: str, request: pytest.FixtureRequest) -> None:
    """A chunk whose write is not finite leaves S as it was before it (neither decayed nor written) and reports a
    non-finite norm; the pieces after it are applied with that S and the later chunks are written."""
    if impl == "triton":
        request.getfixturevalue("interpreter")
    inp = inputs(Span(48, 40, 72, 16, 0, f32, fire_last=True))
    inp.V[int(inp.write_offsets[1]) + 3, 5] = float("nan")  # the second of three chunks
    y_ref, S_ref, y_out, S_out = inp.y.clone(), inp.S.clone(), inp.y.clone(), inp.S.clone()
    args = (inp.offsets, inp.V, inp.X, inp.write_offsets, inp.beta, 0.9, None, None)
    ref = chunk_scan_naive(y_ref, inp.x, S_ref, 1, *args)
    out = chunk_scan(y_out, inp.x, S_out, 1, *args, impl=impl)
    assert out.isfinite().tolist() == [True, False, True]
    assert_close("norms", ref, out, RATIO[f32])
    assert_close("y", y_ref, y_out, RATIO[f32])
    assert_close("S", S_ref, S_out, RATIO[f32])
    # skipping the refused chunk is not the same as writing nothing at all: the third chunk moved S
    y_two, S_two = inp.y.clone(), inp.S.clone()
    chunk_scan_naive(y_two, inp.x, S_two, 1, inp.offsets[:3], inp.V, inp.X, inp.write_offsets[:2], inp.beta, 0.9)
    assert not torch.allclose(S_two[1], S_out[1])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_scan_validates_before_launch(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inp = inputs(Span(40, 40, 72, 16, 0, f32))
    y, x, S, offsets, V, X, wo, beta, base = inp

    def call(**change) -> None:
        args = {"y": y, "x": x, "S": S, "slot": 1, "offsets": offsets, "V": V, "X": X, "write_offsets": wo,
                "beta": beta, "base": base, **change}
        chunk_scan(**args, impl=impl)

    with pytest.raises(IndexError):
        call(slot=3)
    with pytest.raises(ValueError, match="ending at the number of rows"):
        call(offsets=torch.tensor([0, 16, 39]))
    with pytest.raises(ValueError, match="non-decreasing"):
        call(offsets=torch.tensor([0, 20, 16, 40]))
    with pytest.raises(ValueError, match="more chunk writes than pieces"):
        call(offsets=torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="ending at the number of rows"):
        call(write_offsets=torch.tensor([0, 16, 30]))
    with pytest.raises(ValueError, match="beta"):
        call(beta=beta[:-1])
    with pytest.raises(ValueError, match="base"):
        call(base=base.T)
    with pytest.raises(ValueError, match="does not match"):
        call(V=V[:, :-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", span_params(GPU_CASES))
@pytest.mark.parametrize("state_dtype", [f32, bf16], ids=["Sfloat32", "Sbfloat16"])
def test_chunk_scan_cuda(case: Span, state_dtype: torch.dtype) -> None:
    ratio = GPU_RATIO[case.dtype] if state_dtype == f32 else 2e-2
    run(case, "auto", ratio, state_dtype, "cuda")
