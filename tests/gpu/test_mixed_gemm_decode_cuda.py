"""GPU tests of the decode kernel (qcompile.kernels.mixed_gemm_decode) on the weights both
mixed-GEMM families prepare (the Hopper layouts and the sm80 v2 layout), against float64.

Every format each layout takes (bf16/fp16 x int4/int8 x signed/unsigned x per-channel /
group 64/128/256 x zero modes), every launch shape (tokens per CTA x rows per CTA x warps),
odd M including token tiles smaller than M (several CTA rows), K whose chunk count no warp
count divides, N at its limit, bias, CUDA-graph capture, a token-count table that mixes the
decode kernel with a GEMM config, and the refusals (M > 32, group 32, row tiles that do not
divide N, the sm80 rowscale layout). Outputs are NaN-poisoned before every call.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from test_mixed_gemm_cuda import ACTS, _check, _poisoned, _problem, _ref, _x  # noqa: E402

from qcompile.kernels import mixed_gemm as mg  # noqa: E402
from qcompile.kernels import mixed_gemm_decode as dec  # noqa: E402
from qcompile.kernels import mixed_gemm_sm80 as m80  # noqa: E402
from qcompile.kernels.ops import dtype_name  # noqa: E402

FAMILIES = {"sm90": mg, "sm80": m80}

# (signed, group (0 = per-channel), zero_mode)
FORMATS = [
    (True, 0, "none"),
    (True, 128, "none"),
    (False, 128, "sub"),
    (True, 64, "add"),
    (False, 256, "none"),
    (False, 0, "sub"),
]


@pytest.fixture(scope="module", autouse=True)
def _gpu():
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        pytest.skip("runs both families' layouts: needs a Hopper GPU (sm_90a kernels)")
    import qcompile.kernels  # noqa: F401  (registers the CUDA dispatcher of the ops)


def _prepared(fam, n, k, bits, signed, group, zero_mode, act, seed=0):
    q, s, z, w = _problem(n, k, bits, signed, group, zero_mode, seed)
    dtype = ACTS[act]
    layout = fam.select_layout(bits, signed, group, zero_mode, n, k, dtype, "cuda")
    assert layout is not None
    tensors = fam.prepare_weight(q.cuda(), s.cuda(), z.cuda() if z is not None else None,
                                 bits, signed, group, zero_mode, layout, dtype)
    return layout, tensors, w


def _run(fam, x, layout, tensors, bits, group, config, bias=None):
    m, n = x.shape[0], tensors[0].shape[0]
    out = _poisoned(m, n, x.dtype)
    res = fam.mixed_gemm_cuda(x, *tensors, bias, bits, True, group, "none", layout,
                              config=config, out=out)
    torch.cuda.synchronize()
    assert res.data_ptr() == out.data_ptr()
    return out


def _decodable(fam_name, layout):
    return not (fam_name == "sm80" and layout == m80.LAYOUT_ROWSCALE)


def _gated_prepared(n, k, bits, signed, group, zero_mode, dtype):
    """A gated MLP's gate and up weights ([n, k] each, seeds 3 and 4) interleaved in 16-row
    tiles and prepared for the sm90 family: (layout, tensors, gate W, up W) (float64 CPU)."""
    from qcompile.kernels import ops

    gate = _problem(n, k, bits, signed, group, zero_mode, seed=3)
    up = _problem(n, k, bits, signed, group, zero_mode, seed=4)
    q, s, z = (ops.interleave_gate_up(a, b) if a is not None else None
               for a, b in zip(gate[:3], up[:3]))
    layout = mg.select_layout(bits, signed, group, zero_mode, 2 * n, k, dtype, "cuda")
    tensors = mg.prepare_weight(q.cuda(), s.cuda(), z.cuda() if z is not None else None,
                                bits, signed, group, zero_mode, layout, dtype)
    return layout, tensors, gate[3], up[3]


@pytest.mark.parametrize("fam_name", list(FAMILIES))
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed,group,zero_mode", FORMATS)
def test_formats(fam_name, act, bits, signed, group, zero_mode):
    fam = FAMILIES[fam_name]
    n, k, m = 256, 512, 5
    group = group or k
    layout, tensors, w = _prepared(fam, n, k, bits, signed, group, zero_mode, act)
    names = fam.candidates(m, n, k, act, bits, group, layout, 132)
    decode_names = [c for c in names if dec.is_name(c)]
    if not _decodable(fam_name, layout):
        # the CUTLASS 2.x int8 rowscale layout is plain [N, K]: no decode kernel reads it
        assert decode_names == []
        with pytest.raises(ValueError, match="decode"):
            _run(fam, _x(m, k, ACTS[act]), layout, tensors, bits, group, "decode.t8.r16.w8")
        return
    assert decode_names, names
    x = _x(m, k, ACTS[act])
    ref = _ref(x, w)
    for name in decode_names:
        out = _run(fam, x, layout, tensors, bits, group, name)
        _check(out, ref, ACTS[act], f"{fam_name} {layout} {name} {act} w{bits} signed={signed} "
                                    f"g={group} {zero_mode}")


_SHAPES = [dec.DecodeChoice(t, r, w, sz) for t in (8, 16, 32) for r in (16, 32, 64)
           for w in (1, 4, 8, 16) for sz in (False, True) if dec.DecodeChoice(t, r, w).valid()]


@pytest.mark.parametrize("fam_name", list(FAMILIES))
@pytest.mark.parametrize("bits", [4, 8])
def test_every_launch_shape(fam_name, bits):
    # K = 13 chunks of 64: no warp count divides it (tail chunks skipped per warp)
    fam = FAMILIES[fam_name]
    n, k = 192, 13 * 64
    layout, tensors, w = _prepared(fam, n, k, bits, False, 64, "sub", "bf16")
    for choice in _SHAPES:
        if n % choice.rows:
            continue
        for m in sorted({1, choice.tokens - 1, choice.tokens}):
            x = _x(m, k, torch.bfloat16, seed=m)
            out = _run(fam, x, layout, tensors, bits, 64, choice)
            _check(out, _ref(x, w), torch.bfloat16, f"{fam_name} w{bits} {choice.name} M={m}")


@pytest.mark.parametrize("fam_name", list(FAMILIES))
@pytest.mark.parametrize("m", [1, 3, 9, 17, 31, 32])
def test_odd_m_with_small_token_tiles_and_bias(fam_name, m):
    # the 8-token tile at m > 8 runs several CTA rows over the same weight
    fam = FAMILIES[fam_name]
    n, k = 512, 1024
    layout, tensors, w = _prepared(fam, n, k, 4, False, 128, "sub", "fp16")
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    x = _x(m, k, torch.float16)
    for choice in (dec.heuristic(m, n, k), dec.DecodeChoice(8, 32, 4)):
        out = _run(fam, x, layout, tensors, 4, 128, choice, bias=bias)
        _check(out, _ref(x, w, bias), torch.float16, f"{fam_name} {choice.name} M={m}")


@pytest.mark.parametrize("fam_name", list(FAMILIES))
@pytest.mark.parametrize("n,k", [(16, 64), (4096, 14336), (1024, 4096)])
def test_shape_limits_and_llama_shapes(fam_name, n, k):
    fam = FAMILIES[fam_name]
    layout, tensors, w = _prepared(fam, n, k, 4, False, 64 if k == 64 else 128, "sub", "bf16")
    x = _x(1, k, torch.bfloat16)
    group = 64 if k == 64 else 128
    out = _run(fam, x, layout, tensors, 4, group, dec.heuristic(1, n, k))
    _check(out, _ref(x, w), torch.bfloat16, f"{fam_name} N={n} K={k}")


def test_sm90_rowscale_int8_per_channel_llama_shape():
    # W8A16 per-channel: the Hopper rowscale layout, scale applied to the fp32 sum
    layout, tensors, w = _prepared(mg, 14336, 4096, 8, True, 4096, "none", "bf16")
    assert layout == mg.LAYOUT_ROWSCALE
    x = _x(2, 4096, torch.bfloat16)
    out = _run(mg, x, layout, tensors, 8, 4096, dec.heuristic(2, 14336, 4096))
    _check(out, _ref(x, w), torch.bfloat16, "rowscale int8 14336x4096")


@pytest.mark.parametrize("fam_name", list(FAMILIES))
def test_cuda_graph_and_token_table(fam_name):
    fam = FAMILIES[fam_name]
    n, k = 256, 1024
    layout, tensors, w = _prepared(fam, n, k, 4, False, 128, "sub", "bf16")
    # a table like the autotuner writes: the decode kernel at m <= 8, a GEMM config beyond
    gemm = next(c for c in fam.candidates(64, n, k, "bf16", 4, 128, layout, 132)
                if not dec.is_name(c))
    table = f"1-8:decode.t8.r16.w4,9-:{gemm}"
    from qcompile.kernels import tuning
    for m in (1, 8, 9, 64):
        x = _x(m, k, torch.bfloat16, seed=m)
        out = _run(fam, x, layout, tensors, 4, 128, tuning.lookup(table, m))
        _check(out, _ref(x, w), torch.bfloat16, f"{fam_name} table M={m}")
    # captured in a CUDA graph, replayed with new inputs
    x = _x(4, k, torch.bfloat16)
    out = _poisoned(4, n, torch.bfloat16)
    choice = dec.DecodeChoice(8, 16, 8)

    def call():
        fam.mixed_gemm_cuda(x, *tensors, None, 4, True, 128, "none", layout, config=choice,
                            out=out)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in (5, 6):
        x.copy_(_x(4, k, torch.bfloat16, seed=seed))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _ref(x, w), torch.bfloat16, f"{fam_name} graph replay seed={seed}")


@pytest.mark.parametrize("fam_name", list(FAMILIES))
def test_refusals(fam_name):
    fam = FAMILIES[fam_name]
    n, k = 48, 256
    layout, tensors, w = _prepared(fam, n, k, 4, False, 64, "sub", "bf16")
    with pytest.raises(ValueError, match="decode"):  # more tokens than the kernel takes
        _run(fam, _x(33, k, torch.bfloat16), layout, tensors, 4, 64, "decode.t32.r16.w8")
    with pytest.raises(ValueError, match="decode"):  # 32-row tiles do not divide N = 48
        _run(fam, _x(1, k, torch.bfloat16), layout, tensors, 4, 64, "decode.t8.r32.w8")
    with pytest.raises(ValueError, match="no decode-kernel choice"):
        fam.choice_from_name("decode.t8.r16.w32")
    assert not any(dec.is_name(c) for c in fam.candidates(33, n, k, "bf16", 4, 64, layout, 132))
    if fam is m80:  # v2 takes group 32, the decode kernel does not (one group per chunk)
        layout, tensors, w = _prepared(fam, 64, 256, 4, False, 32, "sub", "bf16")
        assert not any(dec.is_name(c) for c in fam.candidates(1, 64, 256, "bf16", 4, 32,
                                                              layout, 132))
        with pytest.raises(ValueError, match="decode"):
            _run(fam, _x(1, 256, torch.bfloat16), layout, tensors, 4, 32, "decode.t8.r16.w8")


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bits,signed,group,zero_mode", [(4, False, 128, "sub"),
                                                         (8, True, 0, "none")])
@pytest.mark.parametrize("m,config", [(1, "decode.t8.r32.w8"), (8, "decode.t8.r32.w16"),
                                      (3, "decode.t8.r16.w8"), (5, None), (17, None)])
def test_gated_mlp_epilogue(act, bits, signed, group, zero_mode, m, config):
    """qcompile::mixed_gemm_gated on gate and up rows interleaved in 16-row tiles: the decode
    kernel's epilogue with 32-row CTAs, the GEMM then the gating otherwise (16-row CTAs, a
    GEMM config for 17 tokens), against float64 silu(x Wg^T) * (x Wu^T)."""
    n, k = 512, 1024
    dtype = ACTS[act]
    group = group or k
    layout, tensors, wg, wu = _gated_prepared(n, k, bits, signed, group, zero_mode, dtype)
    x = _x(m, k, dtype)
    ref = torch.nn.functional.silu(_ref(x, wg)) * _ref(x, wu)
    out = mg.mixed_gemm_cuda(x, *tensors, None, bits, True, group, "none", layout,
                             config=config, gated=True)
    _check(out, ref, dtype, f"gated {config} M={m}")
    # the op through the dispatcher, its config a token table
    op_out = torch.ops.qcompile.mixed_gemm_gated(x, *tensors, None, bits, True, group, "none",
                                                 dtype_name(dtype), layout, config or "")
    _check(op_out, ref, dtype, f"op gated {config} M={m}")


def _rms64(x, weight, eps):
    """float64 RMSNorm of x (CUDA, activation type) on the CPU."""
    xd = x.double().cpu()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double().cpu()


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bits,signed,group,zero_mode", [(4, False, 128, "sub"),
                                                         (4, True, 64, "add"),
                                                         (8, True, 0, "none")])
@pytest.mark.parametrize("m,config", [(1, "decode.t8.r32.w8"), (3, "decode.t8.r16.w16"),
                                      (8, "decode.t8.r32.w4"), (11, "decode.t16.r16.w8"),
                                      (2, "decode.t8.r64.w4"), (16, "decode.t16.r64.w8"),
                                      (5, None), (17, None)])
def test_rms_norm_and_residual_in_the_kernel(act, bits, signed, group, zero_mode, m, config):
    """mixed_gemm with an RMSNorm before (norm weight on the B fragments, sum of squares from
    the same fragments, r_m after the MMA) and a residual after, in the decode kernel for few
    tokens and as PyTorch ops around a GEMM config (17 tokens), against float64
    rms_norm(x) W^T + residual; x scaled up so that the norm matters (rms ~ 6)."""
    n, k = 512, 1024
    dtype = ACTS[act]
    layout, tensors, w = _prepared(mg, n, k, bits, signed, group or k, zero_mode, act, seed=5)
    x = (_x(m, k, dtype) * 6).to(dtype)
    g = torch.Generator(device="cuda").manual_seed(9)
    weight = (torch.rand(k, device="cuda", generator=g) + 0.5).to(dtype)
    residual = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    eps = 1e-5
    normed = _rms64(x, weight, eps)
    ref = normed @ w.t()
    grp = group or k
    out = mg.mixed_gemm_cuda(x, *tensors, None, bits, True, grp, "none", layout, config=config,
                             norm=weight, eps=eps)
    _check(out, ref, dtype, f"norm {config} M={m}")
    out = mg.mixed_gemm_cuda(x, *tensors, None, bits, True, grp, "none", layout, config=config,
                             residual=residual)
    _check(out, _ref(x, w) + residual.double().cpu(), dtype, f"residual {config} M={m}")
    out = mg.mixed_gemm_cuda(x, *tensors, None, bits, True, grp, "none", layout, config=config,
                             norm=weight, eps=eps, residual=residual)
    _check(out, ref + residual.double().cpu(), dtype, f"norm + residual {config} M={m}")
    # the op through the dispatcher, its config a token table
    op_out = torch.ops.qcompile.mixed_gemm(x, *tensors, None, bits, True, grp, "none",
                                           dtype_name(dtype), layout, config or "", weight, eps,
                                           residual)
    _check(op_out, ref + residual.double().cpu(), dtype, f"op norm + residual {config} M={m}")


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("m,config", [(1, "decode.t8.r32.w8"), (4, "decode.t8.r16.w8"),
                                      (17, None)])
def test_rms_norm_in_the_gated_kernel(act, m, config):
    """mixed_gemm_gated with an RMSNorm before: silu(n(x) Wg^T) * (n(x) Wu^T), n the RMSNorm,
    in the 32-row gated epilogue, the 16-row kernel then the gating, and a GEMM config."""
    n, k, bits, group = 512, 1024, 4, 128
    dtype = ACTS[act]
    layout, tensors, wg, wu = _gated_prepared(n, k, bits, False, group, "sub", dtype)
    x = (_x(m, k, dtype) * 3).to(dtype)
    weight = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    normed = _rms64(x, weight, 1e-6)
    ref = torch.nn.functional.silu(normed @ wg.t()) * (normed @ wu.t())
    out = mg.mixed_gemm_cuda(x, *tensors, None, bits, True, group, "none", layout,
                             config=config, gated=True, norm=weight, eps=1e-6)
    _check(out, ref, dtype, f"gated norm {config} M={m}")
    op_out = torch.ops.qcompile.mixed_gemm_gated(x, *tensors, None, bits, True, group, "none",
                                                 dtype_name(dtype), layout, config or "", weight, 1e-6)
    _check(op_out, ref, dtype, f"op gated norm {config} M={m}")


def test_rms_norm_and_residual_refusals():
    """Wrong norm / residual shapes are ValueErrors, not a wrong read."""
    layout, tensors, _ = _prepared(mg, 256, 512, 4, False, 128, "sub", "bf16")
    x = _x(2, 512, torch.bfloat16)
    with pytest.raises(ValueError, match="norm"):
        mg.mixed_gemm_cuda(x, *tensors, None, 4, True, 128, "none", layout,
                           config="decode.t8.r16.w8", norm=torch.ones(256, device="cuda",
                                                                      dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="residual"):
        torch.ops.qcompile.mixed_gemm(x, *tensors, None, 4, True, 128, "none", "bfloat16",
                                      layout, "", None, 0.0,
                                      torch.zeros(2, 128, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bits,signed,group,zero_mode", [(4, False, 128, "sub"),
                                                         (8, True, 0, "none")])
@pytest.mark.parametrize("m,config", [(1, "decode.t8.r32.w8"), (3, "decode.t8.r16.w16"),
                                      (8, "decode.t8.r32.w4"), (11, "decode.t16.r16.w8"),
                                      (2, "decode.t8.r64.w4"), (16, "decode.t16.r64.w8"),
                                      (5, None), (17, None)])
def test_norm_out_then_given_sums(act, bits, signed, group, zero_mode, m, config):
    """An op that adds a skip connection and writes the next RMSNorm's input (out * weight,
    the sums of out^2 over 16-row tiles) from the decode kernel's epilogue, then an op and a
    gated op that read them (norm_ssq) instead of normalizing themselves; a GEMM config (17
    tokens) runs both as PyTorch ops. Against float64."""
    k = n = 1024
    dtype = ACTS[act]
    grp = group or k
    layout, tensors, w = _prepared(mg, n, k, bits, signed, grp, zero_mode, act, seed=7)
    x = _x(m, k, dtype)
    g = torch.Generator(device="cuda").manual_seed(11)
    residual = (torch.randn(m, n, device="cuda", generator=g) * 4).to(dtype)
    weight = (torch.rand(n, device="cuda", generator=g) + 0.5).to(dtype)
    out, normed, sums = mg.mixed_gemm_cuda(x, *tensors, None, bits, True, grp, "none", layout,
                                           config=config, residual=residual, next_norm=weight)
    ref = _ref(x, w) + residual.double().cpu()
    _check(out, ref, dtype, f"norm_out out {config} M={m}")
    _check(normed, out.double().cpu() * weight.double().cpu(), dtype, f"normed {config} M={m}")
    want = out.double().pow(2).reshape(m, n // 16, 16).sum(-1)
    assert sums.dtype == torch.float32 and sums.shape == (m, n // 16)
    torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=1e-3)
    # the reader: the same weight again as the second op, K = N
    od = out.double().cpu()
    normed64 = od * torch.rsqrt(od.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double().cpu()
    y = mg.mixed_gemm_cuda(normed, *tensors, None, bits, True, grp, "none", layout,
                           config=config, eps=1e-5, norm_ssq=sums)
    _check(y, normed64 @ w.t(), dtype, f"given sums {config} M={m}")
    # through the dispatcher: the producer op, then the reader
    o2, n2, s2 = torch.ops.qcompile.mixed_gemm_norm_out(x, *tensors, None, bits, True, grp,
                                                        "none", dtype_name(dtype), layout,
                                                        config or "",
                                                        residual, weight)
    _check(o2, ref, dtype, f"op norm_out {config} M={m}")
    y2 = torch.ops.qcompile.mixed_gemm(n2, *tensors, None, bits, True, grp, "none",
                                       dtype_name(dtype), layout, config or "", None, 1e-5, None,
                                       s2)
    _check(y2, normed64 @ w.t(), dtype, f"op given sums {config} M={m}")


@pytest.mark.parametrize("m,config", [(1, "decode.t8.r32.w8"), (4, "decode.t8.r16.w8"),
                                      (17, None)])
def test_given_sums_in_the_gated_kernel(m, config):
    """mixed_gemm_gated reading x * weight and its sums (norm_ssq): the 32-row gated epilogue,
    the 16-row kernel then the gating, and a GEMM config."""
    from qcompile.kernels import ops

    n, k, bits, group = 512, 1024, 4, 128
    dtype = torch.bfloat16
    layout, tensors, wg, wu = _gated_prepared(n, k, bits, False, group, "sub", dtype)
    h = (_x(m, k, dtype) * 3).to(dtype)
    weight = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    xg = (h.float() * weight.float()).to(dtype)
    sums = ops.norm_sums(h)
    normed = _rms64(h, weight, 1e-6)
    ref = torch.nn.functional.silu(normed @ wg.t()) * (normed @ wu.t())
    out = mg.mixed_gemm_cuda(xg, *tensors, None, bits, True, group, "none", layout,
                             config=config, gated=True, eps=1e-6, norm_ssq=sums)
    _check(out, ref, dtype, f"gated given sums {config} M={m}")
    op_out = torch.ops.qcompile.mixed_gemm_gated(xg, *tensors, None, bits, True, group, "none",
                                                 dtype_name(dtype), layout, config or "", None, 1e-6, sums)
    _check(op_out, ref, dtype, f"op gated given sums {config} M={m}")


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bits,signed,group,zero_mode", [(4, False, 128, "sub"),
                                                         (8, True, 64, "none")])
@pytest.mark.parametrize("m,rows,warps", [(1, 32, 4), (5, 16, 8), (8, 32, 16)])
def test_staged_scales_in_every_fused_path(act, bits, signed, group, zero_mode, m, rows, warps):
    """The scales and zeros staged in shared memory (``.sz`` launches) give the same bits as
    the launch that loads them in the main loop, in the plain, gated, norm, residual,
    norm_out and given-sums kernels, and match float64."""
    from qcompile.kernels import ops

    n, k = 512, 1024
    dtype = ACTS[act]
    plain = dec.DecodeChoice(8, rows, warps)
    staged = dec.DecodeChoice(8, rows, warps, sz_smem=True)
    layout, tensors, w = _prepared(mg, n, k, bits, signed, group, zero_mode, act, seed=3)
    x = (_x(m, k, dtype) * 3).to(dtype)
    g = torch.Generator(device="cuda").manual_seed(4)
    nw = (torch.rand(k, device="cuda", generator=g) + 0.5).to(dtype)
    residual = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    next_w = (torch.rand(n, device="cuda", generator=g) + 0.5).to(dtype)
    xg = (x.float() * nw.float()).to(dtype)
    runs = {
        "plain": dict(),
        "norm + residual": dict(norm=nw, eps=1e-5, residual=residual),
        "norm_out": dict(residual=residual, next_norm=next_w),
        "given sums": dict(eps=1e-5, norm_ssq=ops.norm_sums(x)),
    }
    refs = {
        "plain": _ref(x, w),
        "norm + residual": _rms64(x, nw, 1e-5) @ w.t() + residual.double().cpu(),
        "norm_out": _ref(x, w) + residual.double().cpu(),
        "given sums": _rms64(x, nw, 1e-5) @ w.t(),
    }
    for what, kw in runs.items():
        xin = xg if what == "given sums" else x
        a = mg.mixed_gemm_cuda(xin, *tensors, None, bits, True, group, "none", layout,
                               config=plain, **kw)
        b = mg.mixed_gemm_cuda(xin, *tensors, None, bits, True, group, "none", layout,
                               config=staged, **kw)
        for ta, tb in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(ta, tb), f"{what} {staged.name} M={m}"
        _check(b[0] if isinstance(b, tuple) else b, refs[what], dtype, f"{what} {staged.name}")
    if rows == 32:
        lay_g, ten_g, wg, wu = _gated_prepared(n, k, bits, signed, group, zero_mode, dtype)
        a = mg.mixed_gemm_cuda(x, *ten_g, None, bits, True, group, "none", lay_g,
                               config=plain, gated=True)
        b = mg.mixed_gemm_cuda(x, *ten_g, None, bits, True, group, "none", lay_g,
                               config=staged, gated=True)
        assert torch.equal(a, b), f"gated {staged.name} M={m}"
        _check(b, torch.nn.functional.silu(_ref(x, wg)) * _ref(x, wu), dtype, "gated staged")
