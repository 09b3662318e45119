"""GPU tests of the small-batch kernel (qcompile.kernels.mixed_gemm_batch) on the Hopper
family's layouts, against float64.

Every format the layouts take (bf16/fp16 x int4/int8 x signed/unsigned x per-channel / group
64/128/256 x zero modes), every launch shape (tokens x rows x warps x K splits of a cluster),
split K ranges that the round of chunk loads does not divide, odd M (several token tiles'
worth of padding), bias, the Llama shapes at 32 and 64 tokens, bit-identical repeats (the
cluster sums its partial tiles in rank order), CUDA-graph capture, and the refusals. Outputs
are NaN-poisoned before every call.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from test_mixed_gemm_cuda import ACTS, _check, _poisoned, _ref, _x  # noqa: E402
from test_mixed_gemm_decode_cuda import FORMATS, _prepared  # noqa: E402

from qcompile.kernels import mixed_gemm as mg  # noqa: E402
from qcompile.kernels import mixed_gemm_batch as bat  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _gpu():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("thread-block clusters and the Hopper layouts: needs a Hopper GPU")
    import qcompile.kernels  # noqa: F401  (registers the CUDA dispatcher of the ops)


def _run(x, layout, tensors, bits, group, config, bias=None):
    m, n = x.shape[0], tensors[0].shape[0]
    out = _poisoned(m, n, x.dtype)
    res = mg.mixed_gemm_cuda(x, *tensors, bias, bits, True, group, "none", layout,
                             config=config, out=out)
    torch.cuda.synchronize()
    assert res.data_ptr() == out.data_ptr()
    return out


def _shapes(n, k, tokens=(16, 32, 64)):
    return [bat.BatchChoice(t, 16 * w * r, w, s) for t in tokens for w in (4, 8) for r in (1, 2)
            for s in (1, 2, 4, 8) if n % (16 * w * r) == 0 and k % (64 * s) == 0]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed,group,zero_mode", FORMATS)
def test_formats(act, bits, signed, group, zero_mode):
    n, k = 256, 1024
    group = group or k
    layout, tensors, w = _prepared(mg, n, k, bits, signed, group, zero_mode, act)
    for m in (17, 64):
        x = _x(m, k, ACTS[act], seed=m)
        ref = _ref(x, w)
        for choice in (bat.BatchChoice(64 if m > 32 else 32, 128, 8, 4),
                       bat.BatchChoice(64, 256, 8, 2), bat.BatchChoice(64, 64, 4, 1)):
            out = _run(x, layout, tensors, bits, group, choice)
            _check(out, ref, ACTS[act], f"{layout} {choice.name} {act} w{bits} signed={signed} "
                                        f"g={group} {zero_mode} M={m}")


@pytest.mark.parametrize("bits", [4, 8])
def test_every_launch_shape(bits):
    # K = 24 chunks: 8 splits give 3 chunks a CTA, which no round of 2 or 4 loads divides
    n, k = 512, 24 * 64
    layout, tensors, w = _prepared(mg, n, k, bits, False, 64, "sub", "bf16")
    for choice in _shapes(n, k):
        for m in sorted({choice.tokens // 2 + 1, choice.tokens}):
            x = _x(m, k, torch.bfloat16, seed=m)
            out = _run(x, layout, tensors, bits, 64, choice)
            _check(out, _ref(x, w), torch.bfloat16, f"w{bits} {choice.name} M={m}")


@pytest.mark.parametrize("m", [9, 17, 33, 50, 63])
def test_odd_m_and_bias(m):
    n, k = 512, 1024
    layout, tensors, w = _prepared(mg, n, k, 4, False, 128, "sub", "fp16")
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    x = _x(m, k, torch.float16, seed=m)
    for choice in (bat.heuristic(m, n, k), bat.BatchChoice(64, 128, 8, 8)):
        out = _run(x, layout, tensors, 4, 128, choice, bias=bias)
        _check(out, _ref(x, w, bias), torch.float16, f"{choice.name} M={m}")


@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("bits,signed,group,zero_mode", [(4, False, 128, "sub"),
                                                         (8, True, 0, "none")])
def test_llama_shapes(n, k, bits, signed, group, zero_mode):
    group = group or k
    layout, tensors, w = _prepared(mg, n, k, bits, signed, group, zero_mode, "bf16")
    for m in (32, 64):
        x = _x(m, k, torch.bfloat16, seed=m)
        ref = _ref(x, w)
        for name in [c for c in mg.candidates(m, n, k, "bf16", bits, group, layout, 132)
                     if bat.is_name(c)][:4]:
            out = _run(x, layout, tensors, bits, group, name)
            _check(out, ref, torch.bfloat16, f"{n}x{k} w{bits} {name} M={m}")


def test_repeats_are_bit_identical_and_graph_replay():
    n, k, m = 1024, 2048, 48
    layout, tensors, w = _prepared(mg, n, k, 4, False, 128, "sub", "bf16")
    choice = bat.BatchChoice(64, 128, 8, 8)
    x = _x(m, k, torch.bfloat16)
    first = _run(x, layout, tensors, 4, 128, choice)
    for _ in range(3):
        assert torch.equal(_run(x, layout, tensors, 4, 128, choice), first)
    out = _poisoned(m, n, torch.bfloat16)

    def call():
        mg.mixed_gemm_cuda(x, *tensors, None, 4, True, 128, "none", layout, config=choice,
                           out=out)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in (5, 6):
        x.copy_(_x(m, k, torch.bfloat16, seed=seed))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _ref(x, w), torch.bfloat16, f"graph replay seed={seed}")


def test_refusals():
    n, k = 192, 512
    layout, tensors, w = _prepared(mg, n, k, 4, False, 64, "sub", "bf16")
    with pytest.raises(ValueError, match="small-batch"):  # more tokens than a tile holds
        _run(_x(65, k, torch.bfloat16), layout, tensors, 4, 64, "batch.t64.r64.w4.s1")
    with pytest.raises(ValueError, match="small-batch"):  # 128-row CTAs do not divide 192
        _run(_x(16, k, torch.bfloat16), layout, tensors, 4, 64, "batch.t16.r128.w8.s1")
    with pytest.raises(ValueError, match="small-batch"):  # K = 7 chunks: 8 splits do not fit
        _run(_x(16, 448, torch.bfloat16), *_prepared(mg, 64, 448, 4, False, 64, "sub",
                                                      "bf16")[:2], 4, 64, "batch.t16.r64.w4.s8")
    with pytest.raises(ValueError, match="no small-batch-kernel choice"):
        mg.choice_from_name("batch.t64.r128.w8.s16")
    # the unprepared shapes: a correct result from the kernel the shape does take
    x = _x(16, k, torch.bfloat16)
    out = _run(x, layout, tensors, 4, 64, "batch.t16.r64.w4.s8")
    _check(out, _ref(x, w), torch.bfloat16, "192x512 t16.r64.w4.s8")
