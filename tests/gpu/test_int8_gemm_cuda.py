"""GPU tests of the CUTLASS int8 GEMM kernels (qcompile.kernels.int8_gemm) against float64.

Every configuration runs on at least one shape; the heuristic's choices run over M in
{1, 7, 16, 17, 128, 2048} with small and large (N, K), bias on/off, bf16/fp16, per-token and
per-tensor row scales, per-channel and scalar column scales. Outputs are poisoned with NaN
before each call (through the caching allocator, which hands the freed block back).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from qcompile.kernels import int8_gemm as ig  # noqa: E402
from qcompile.kernels import mixed_gemm_decode as dec  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
SHAPES = {"small": (256, 512), "large": (4096, 4096)}


def _arch() -> str | None:
    return ig.device_arch() if torch.cuda.is_available() else None


def _inputs(m, n, k, per_token, per_channel, with_bias, out_dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
    rs_shape = (m, 1) if per_token else (1, 1)
    cs_shape = (1, n) if per_channel else (1, 1)
    # Scales spread over a decade so that a swapped row/column role would show.
    row_scale = torch.rand(rs_shape, device="cuda", generator=g) * 9e-3 + 1e-3
    col_scale = torch.rand(cs_shape, device="cuda", generator=g) * 9e-3 + 1e-3
    bias = torch.randn(n, device="cuda", generator=g).to(out_dtype) if with_bias else None
    return xq, wq, row_scale, col_scale, bias


def _reference(xq, wq, row_scale, col_scale, bias):
    out = (xq.double() @ wq.double().t()) * row_scale.double() * col_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out


def _poison(m, n, dtype):
    # Fill a block of the output's size with NaN and free it: the caching allocator hands the
    # same block to the kernel's output, so unwritten elements stay NaN.
    torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


def _check(out, ref, out_dtype, what):
    assert out.dtype == out_dtype and out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN) or non-finite outputs"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[out_dtype], f"{what}: relative L2 error {err:.2e}"


def _run(m, n, k, per_token, per_channel, with_bias, out_dtype, config=None, seed=0):
    xq, wq, rs, cs, bias = _inputs(m, n, k, per_token, per_channel, with_bias, out_dtype, seed)
    _poison(m, n, out_dtype)
    out = ig.int8_gemm_cuda(xq, wq, rs, cs, bias, out_dtype, config=config)
    torch.cuda.synchronize()
    name = ig._name(config) if config else "heuristic"
    _check(out, _reference(xq, wq, rs, cs, bias), out_dtype,
           f"{name} M={m} N={n} K={k} per_token={per_token} per_channel={per_channel} bias={with_bias}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("m", [1, 7, 16, 17, 128, 2048])
def test_heuristic_all_m(m, shape, out_dtype):
    n, k = SHAPES[shape]
    seed = m * 7 + n
    # Alternate the scale kinds and bias over the grid so every combination appears.
    per_token = m % 2 == 0
    per_channel = shape == "large" or m in (1, 17)
    with_bias = (m + len(shape)) % 2 == 0
    _run(m, n, k, per_token, per_channel, with_bias, out_dtype, seed=seed)


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "per_tensor"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "scalar_col"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("m", [7, 300])
def test_scale_kinds_and_bias(m, per_token, per_channel, with_bias):
    _run(m, 1024, 2048, per_token, per_channel, with_bias, torch.bfloat16, seed=m)


def _configs_for_device():
    arch = _arch()
    cfgs = list(ig.available_configs("sm_80"))
    if arch == "sm_90a":
        cfgs = list(ig.available_configs("sm_90a")) + cfgs
    return cfgs


def _check_config(cfg, out_dtype):
    # Ragged sizes (not multiples of any tile) exercise the boundary handling of each config.
    for m, n, k, per_token, per_channel, bias in ((1, 4096, 4096, False, True, True),
                                                  (33, 1032, 1040, True, False, False),
                                                  (517, 2056, 4096, True, True, True)):
        _run(m, n, k, per_token, per_channel, bias, out_dtype, config=cfg, seed=m + n)


@pytest.mark.parametrize("cfg", _configs_for_device() if torch.cuda.is_available() else [],
                         ids=ig.config_name)
def test_every_config_bf16(cfg):
    _check_config(cfg, torch.bfloat16)


def _heuristic_configs():
    arch = _arch()
    cfgs = {ig.choose_config(m, 4096, 4096, torch.float16, "sm_80") for m in (1, 2048)}
    if arch == "sm_90a":
        cfgs |= {ig.choose_config(m, 4096, 4096, torch.float16, arch) for m in (1, 17, 128, 2048)}
    return sorted(cfgs, key=ig.config_name)


# fp16 output for the configurations the heuristic picks (the others differ only in bf16 vs
# fp16 conversion in the epilogue, covered by the heuristic tests).
@pytest.mark.parametrize("cfg", _heuristic_configs() if torch.cuda.is_available() else [],
                         ids=ig.config_name)
def test_heuristic_configs_fp16(cfg):
    _check_config(cfg, torch.float16)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_streamk_split_modes(splits):
    if _arch() != "sm_90a":
        pytest.skip("sm90 stream-K configs need an sm_90 GPU")
    for cfg in ig.available_configs("sm_90a"):
        if cfg.streamk:
            cfg = dataclasses.replace(cfg, splits=splits)
            _run(16, 4096, 4096, True, True, True, torch.bfloat16, config=cfg, seed=splits)


def test_cuda_graph_capture_and_replay():
    m, n, k = 16, 1024, 2048
    xq, wq, rs, cs, bias = _inputs(m, n, k, True, True, True, torch.bfloat16, seed=1)
    ig.int8_gemm_cuda(xq, wq, rs, cs, bias, torch.bfloat16)  # load the library outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ig.int8_gemm_cuda(xq, wq, rs, cs, bias, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ig.int8_gemm_cuda(xq, wq, rs, cs, bias, torch.bfloat16)
    for seed in (2, 3):
        new = _inputs(m, n, k, True, True, True, torch.bfloat16, seed=seed)
        for dst, src in zip((xq, wq, rs, cs, bias), new):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _reference(*new), torch.bfloat16, f"graph replay seed={seed}")


def test_registered_op_uses_kernel_and_falls_back():
    ops = pytest.importorskip("qcompile.kernels.ops")
    import qcompile.kernels  # noqa: F401  (registers the CUDA dispatcher of the ops)
    xq, wq, rs, cs, bias = _inputs(17, 512, 1024, True, True, True, torch.bfloat16, seed=5)
    out = torch.ops.qcompile.int8_gemm(xq, wq, rs, cs, bias, "bfloat16")
    _check(out, _reference(xq, wq, rs, cs, bias), torch.bfloat16, "registered op")
    # K % 16 != 0 is outside the kernels: the op falls back to the reference.
    xq, wq, rs, cs, bias = _inputs(17, 512, 1000, True, True, None, torch.float32, seed=6)
    assert ig.supports(xq, wq, rs, cs, bias, torch.bfloat16) is not None
    out = torch.ops.qcompile.int8_gemm(xq, wq, rs, cs, bias, "bfloat16")
    ref = ops.int8_gemm_reference(xq, wq, rs, cs, bias, torch.bfloat16)
    torch.testing.assert_close(out, ref)


def test_rejects_unsupported_inputs():
    xq, wq, rs, cs, _ = _inputs(4, 64, 1000, True, True, False, torch.bfloat16, seed=7)
    with pytest.raises(ValueError, match="K % 16"):
        ig.int8_gemm_cuda(xq, wq, rs, cs, None, torch.bfloat16)
    xq, wq, rs, cs, _ = _inputs(4, 64, 1024, True, True, False, torch.bfloat16, seed=8)
    with pytest.raises(ValueError, match="out_dtype"):
        ig.int8_gemm_cuda(xq, wq, rs, cs, None, torch.float32)


# --- the decode kernel (int8_gemm_decode.cu): M <= 32, plain int8 operands ---------------

_DECODE_SHAPES = [dec.DecodeChoice(t, r, w) for t in (8, 16, 32) for r in (16, 32, 64)
                  for w in (1, 3, 16) if dec.DecodeChoice(t, r, w).valid()]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_every_launch_shape(out_dtype):
    # K = 13 chunks of 64: no warp count divides it; every scale kind and bias appears
    n, k = 192, 13 * 64
    for choice in _DECODE_SHAPES:
        if n % choice.rows:
            continue
        for m in sorted({1, choice.tokens - 1, choice.tokens}):
            _run(m, n, k, m % 2 == 0, m % 3 != 0, m % 4 < 2, out_dtype, config=choice, seed=m)


@pytest.mark.parametrize("m", [1, 7, 16, 17, 32])
def test_decode_llama_shapes(m):
    for n, k in ((14336, 4096), (1024, 4096), (4096, 14336)):
        _run(m, n, k, True, True, m % 2 == 0, torch.bfloat16, config=dec.heuristic(m, n, k), seed=m)


def test_decode_heuristic_names_and_refusals():
    assert isinstance(ig.heuristic_choice(8, 4096, 4096, torch.bfloat16, _arch()), dec.DecodeChoice)
    assert not isinstance(ig.heuristic_choice(9, 4096, 4096, torch.bfloat16, _arch()), dec.DecodeChoice)
    names = ig.candidates(1, 4096, 4096, torch.bfloat16, _arch())
    assert names[0].startswith("decode.") and ig.choice_from_name(names[0]) == dec.heuristic(1, 4096, 4096)
    xq, wq, rs, cs, bias = _inputs(33, 48, 256, True, True, False, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="decode kernel"):  # more tokens than it takes
        ig.int8_gemm_cuda(xq, wq, rs, cs, None, torch.bfloat16, dec.DecodeChoice(32, 16, 4))
    with pytest.raises(ValueError, match="decode kernel"):  # 32-row tiles do not divide 48
        ig.int8_gemm_cuda(xq[:1], wq, rs[:1], cs, None, torch.bfloat16, dec.DecodeChoice(8, 32, 4))
    xq, wq, rs, cs, bias = _inputs(1, 64, 96, True, True, False, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="decode kernel"):  # K not a multiple of 64
        ig.int8_gemm_cuda(xq, wq, rs, cs, None, torch.bfloat16, dec.DecodeChoice(8, 16, 4))
    # the heuristic leaves K = 96 to CUTLASS
    _run(1, 64, 96, True, True, True, torch.bfloat16)


def test_decode_cuda_graph():
    m, n, k = 4, 512, 1024
    xq, wq, rs, cs, bias = _inputs(m, n, k, True, True, True, torch.bfloat16, 3)
    choice = dec.heuristic(m, n, k)
    ig.int8_gemm_cuda(xq, wq, rs, cs, bias, torch.bfloat16, choice)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ig.int8_gemm_cuda(xq, wq, rs, cs, bias, torch.bfloat16, choice)
    for seed in (4, 5):
        x2, _, r2, _, _ = _inputs(m, n, k, True, True, True, torch.bfloat16, seed)
        xq.copy_(x2)
        rs.copy_(r2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _reference(xq, wq, rs, cs, bias), torch.bfloat16, f"graph replay seed={seed}")


# --- asymmetric activations: acc - azp[m] * azp_adj[n] in int32 before the rescale ---


def _run_azp(m, n, k, per_token, with_bias, out_dtype, config=None, seed=0):
    xq, wq, rs, cs, bias = _inputs(m, n, k, per_token, True, with_bias, out_dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    azp = torch.randint(-128, 128, rs.shape, dtype=torch.int32, device="cuda", generator=g)
    adj = wq.sum(dim=1, dtype=torch.int32)
    _poison(m, n, out_dtype)
    out = ig.int8_gemm_cuda(xq, wq, rs, cs, bias, out_dtype, config, azp, adj)
    torch.cuda.synchronize()
    # the dequantized product: (xq - zp) * s_x times q * s_w
    ref = ((xq.double() - azp.double()) @ wq.double().t()) * rs.double() * cs.double()
    if bias is not None:
        ref = ref + bias.double()
    name = ig._name(config) if config else "heuristic"
    _check(out, ref, out_dtype, f"{name} azp M={m} N={n} K={k} per_token={per_token}")
    # the correction is exact: the op's reference gives the same numbers
    from qcompile.kernels.ops import int8_gemm_reference
    expect = int8_gemm_reference(xq, wq, rs, cs, bias, out_dtype, "", azp, adj)
    assert (out.double() - expect.double()).abs().max().item() <= \
        4 * expect.double().abs().max().item() * torch.finfo(out_dtype).eps, name


@pytest.mark.parametrize("cfg", [*_configs_for_device(), *_DECODE_SHAPES[:3]]
                         if torch.cuda.is_available() else [], ids=lambda c: ig._name(c))
def test_zero_points_every_config(cfg):
    name = ig._name(cfg)
    dims = ((1, 4096, 4096), (7, 1024, 1024)) if name.startswith("decode.") else \
        ((1, 4096, 4096), (33, 1032, 1040), (517, 2056, 4096))
    for m, n, k in dims:
        _run_azp(m, n, k, True, m % 2 == 1, torch.bfloat16, config=cfg, seed=m + n)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 128, 2048])
def test_zero_points_heuristic_all_m(m, out_dtype):
    _run_azp(m, 4096, 4096, True, True, out_dtype, seed=m)
    _run_azp(m, 1024, 512, False, False, out_dtype, seed=m)  # one zero point for all tokens


def test_zero_points_are_checked():
    xq, wq, rs, cs, _ = _inputs(5, 64, 128, True, True, False, torch.bfloat16, 0)
    adj = wq.sum(dim=1, dtype=torch.int32)
    azp = torch.zeros(5, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="azp and azp_adj come together"):
        ig.int8_gemm_cuda(xq, wq, rs, cs, None, torch.bfloat16, None, azp, None)
    with pytest.raises(ValueError, match="int32"):
        ig.int8_gemm_cuda(xq, wq, rs, cs, None, torch.bfloat16, None, azp.long(), adj)
    with pytest.raises(ValueError, match="zero-point shapes"):
        ig.int8_gemm_cuda(xq, wq, rs, cs, None, torch.bfloat16, None, azp[:1], adj)
