"""GPU tests of the Hopper CUTLASS mixed-input GEMM (qcompile.kernels.mixed_gemm) against float64.

Every supported format (bf16/fp16 x int4/int8 x signed/unsigned x per-channel/group
64/128/256 x zero modes none/sub/add) runs against a float64 product with the dequantized
weight (group 32 is refused); odd M (1, 3, 17, 100); N and K at their alignment limits;
every configuration at least once (each stream-K build in its data-parallel, split-K and
stream-K modes); bias; CUDA-graph capture; the op's dispatch and its fallbacks for what the
kernel can't take. Outputs are NaN-poisoned before every kernel call.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from qcompile.kernels import mixed_gemm as mg  # noqa: E402
from qcompile.kernels import ops  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
ACTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def _hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a kernels need a Hopper GPU")
    mg.build_all()
    import qcompile.kernels  # noqa: F401  (registers the CUDA dispatcher of the ops)


def _problem(n, k, bits, signed, group, zero_mode, seed):
    """Random integer weight, scales, zeros (CPU, float32) and their float64 dequantization."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int16)
    if signed or bits == 4:
        q = q.to(torch.int8)  # unsigned 8-bit values stay int16 (they don't fit int8)
    groups = k // group
    # Scales spread over a decade so that a row/group mix-up shows in the error.
    s = (torch.rand(n, groups, generator=g) * 0.9 + 0.1) / (1 << (bits - 1))
    z = None
    if zero_mode == "sub":
        z = torch.randint(lo, hi, (n, groups), generator=g).to(torch.float32)
    elif zero_mode == "add":
        z = torch.randn(n, groups, generator=g) * s
    qd = q.double().reshape(n, groups, group)
    if zero_mode == "sub":
        w = (qd - z.double()[..., None]) * s.double()[..., None]
    elif zero_mode == "add":
        w = qd * s.double()[..., None] + z.double()[..., None]
    else:
        w = qd * s.double()[..., None]
    return q, s, z, w.reshape(n, k)


def _prepared(n, k, bits, signed, group, zero_mode, act, seed=0):
    q, s, z, w = _problem(n, k, bits, signed, group, zero_mode, seed)
    dtype = ACTS[act]
    layout = mg.select_layout(bits, signed, group, zero_mode, n, k, dtype, "cuda")
    assert layout is not None
    qw, sc, zz = mg.prepare_weight(q.cuda(), s.cuda(), z.cuda() if z is not None else None,
                                   bits, signed, group, zero_mode, layout, dtype)
    return layout, qw, sc, zz, w


def _x(m, k, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, k, device="cuda", generator=g).to(dtype)


def _ref(x, w, bias=None):
    out = x.double().cpu() @ w.t()
    if bias is not None:
        out = out + bias.double().cpu()
    return out


def _poisoned(m, n, dtype):
    return torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


def _check(out, ref, dtype, what):
    assert out.dtype == dtype and tuple(out.shape) == tuple(ref.shape), what
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN) or non-finite outputs"
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], f"{what}: relative L2 error {err:.2e} > {TOL[dtype]:.0e}"


def _run(x, qw, sc, zz, bits, group, layout, bias=None, config=None):
    m, n = x.shape[0], qw.shape[0]
    out = _poisoned(m, n, x.dtype)
    res = mg.mixed_gemm_cuda(x, qw, sc, zz, bias, bits, True, group, "none", layout,
                             config=config, out=out)
    torch.cuda.synchronize()
    assert res.data_ptr() == out.data_ptr()
    return out


# (signed, group (0 = per-channel), zero_mode): every way a format reaches the two layouts
FORMATS = [
    (True, 0, "none"),     # per-channel symmetric  -> rowscale
    (True, 128, "none"),   # GPTQ-sym style         -> groupzero, z' = 0
    (False, 128, "sub"),   # AWQ / GPTQ asym        -> groupzero
    (True, 64, "add"),     # HQQ-style float zeros  -> groupzero
    (False, 256, "none"),  # unsigned, no zeros     -> groupzero, z' = 2**(bits-1) * s
    (False, 0, "sub"),     # per-channel asymmetric -> groupzero with g = K
]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed,group,zero_mode", FORMATS)
def test_formats(act, bits, signed, group, zero_mode):
    n, k, m = 256, 512, 17
    group = group or k
    layout, qw, sc, zz, w = _prepared(n, k, bits, signed, group, zero_mode, act)
    rowscale = signed and group == k and zero_mode == "none"
    expect = mg.LAYOUT_ROWSCALE if rowscale else mg.LAYOUT_GROUPZERO
    assert layout == expect
    x = _x(m, k, ACTS[act])
    out = _run(x, qw, sc, zz, bits, group, layout)
    _check(out, _ref(x, w), ACTS[act], f"{act} w{bits} signed={signed} g={group} {zero_mode}")


@pytest.mark.parametrize("act", list(ACTS))
def test_group32(act):
    # group 32 needs a 32-wide K tile, which CUTLASS's mixed-input main loop refuses; the
    # family must say so (the weight then stays in the reference layout), unless a config
    # with tile_k 32 exists, which must then be right.
    n, k = 256, 512
    if not mg._family(act, 4, 2, 32, k):
        assert mg.select_layout(4, False, 32, "sub", n, k, ACTS[act], "cuda") is None
        return
    layout, qw, sc, zz, w = _prepared(n, k, 4, False, 32, "sub", act)
    for m in (1, 40):
        x = _x(m, k, ACTS[act])
        _check(_run(x, qw, sc, zz, 4, 32, layout), _ref(x, w), ACTS[act], f"{act} g32 M={m}")


@pytest.mark.parametrize("m", [1, 3, 17, 100])
@pytest.mark.parametrize("fmt", [(4, False, 128, "sub"), (8, True, 0, "none")])
def test_odd_m(m, fmt):
    bits, signed, group, zero_mode = fmt
    n, k = 512, 1024
    group = group or k
    layout, qw, sc, zz, w = _prepared(n, k, bits, signed, group, zero_mode, "bf16")
    x = _x(m, k, torch.bfloat16)
    _check(_run(x, qw, sc, zz, bits, group, layout), _ref(x, w), torch.bfloat16, f"M={m} {fmt}")


@pytest.mark.parametrize("n,k,group",
                         [(16, 64, 64), (272, 192, 64), (48, 320, 0), (4112, 128, 128)])
@pytest.mark.parametrize("bits", [4, 8])
def test_alignment_limits(n, k, group, bits):
    group = group or k
    signed, zero_mode = (True, "none") if group == k else (False, "sub")
    layout, qw, sc, zz, w = _prepared(n, k, bits, signed, group, zero_mode, "bf16")
    for m in (1, 33):
        x = _x(m, k, torch.bfloat16)
        _check(_run(x, qw, sc, zz, bits, group, layout), _ref(x, w), torch.bfloat16,
               f"N={n} K={k} g={group} w{bits} M={m}")


def _choices(cfg):
    if not cfg.streamk:
        return [mg.Choice(cfg)]
    return [mg.Choice(cfg, mg.DECOMP_DATA_PARALLEL, 1), mg.Choice(cfg, mg.DECOMP_SPLIT_K, 3),
            mg.Choice(cfg, mg.DECOMP_STREAM_K, 1), mg.Choice(cfg, mg.DECOMP_HEURISTIC, 1)]


@pytest.mark.parametrize("cfg", mg.CONFIGS, ids=mg.config_name)
def test_every_config(cfg):
    n, k, m = 384, 1024, 33
    act = cfg.act
    if cfg.mode == 0:
        bits, signed, group, zero_mode = cfg.bits, True, k, "none"
    else:
        bits, signed, group, zero_mode = cfg.bits, False, 128, "sub"
    layout, qw, sc, zz, w = _prepared(n, k, bits, signed, group, zero_mode, act)
    assert mg._MODE_OF_LAYOUT[layout] == cfg.mode
    g = torch.Generator(device="cuda").manual_seed(5)
    bias = torch.randn(n, device="cuda", generator=g).to(ACTS[act])
    x = _x(m, k, ACTS[act])
    ref = _ref(x, w, bias)
    for choice in _choices(cfg):
        out = _run(x, qw, sc, zz, bits, group, layout, bias=bias, config=choice)
        _check(out, ref, ACTS[act], f"{mg.config_name(cfg)} {choice}")


def test_heuristic_shapes():
    # The heuristic's picks at the benchmark's decode/prefill sizes (small N to stay quick).
    for fmt in [(4, False, 128, "sub"), (8, True, 0, "none")]:
        bits, signed, group, zero_mode = fmt
        n, k = 4096, 1024
        group = group or k
        layout, qw, sc, zz, w = _prepared(n, k, bits, signed, group, zero_mode, "bf16")
        for m in (1, 16, 64, 256, 300):
            x = _x(m, k, torch.bfloat16)
            _check(_run(x, qw, sc, zz, bits, group, layout), _ref(x, w), torch.bfloat16,
                   f"{fmt} M={m} "
                   f"{mg.choose_config(m, n, k, 'bf16', bits, mg._MODE_OF_LAYOUT[layout])}")


def test_3d_input_and_op_dispatch():
    n, k = 256, 512
    layout, qw, sc, zz, w = _prepared(n, k, 4, False, 128, "sub", "bf16")
    x = torch.randn(2, 5, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.ops.qcompile.mixed_gemm(x, qw, sc, zz, bias, 4, False, 128, "sub",
                                        "bfloat16", layout)
    assert out.shape == (2, 5, n)
    _check(out.reshape(10, n), _ref(x.reshape(10, k), w, bias), torch.bfloat16, "op, 3-D x")


def test_cuda_graph():
    n, k = 1024, 1024
    layout, qw, sc, zz, w = _prepared(n, k, 4, False, 128, "sub", "bf16")
    x = _x(16, k, torch.bfloat16)
    mg.mixed_gemm_cuda(x, qw, sc, zz, None, 4, False, 128, "sub", layout)  # warm up (load lib)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mg.mixed_gemm_cuda(x, qw, sc, zz, None, 4, False, 128, "sub", layout)
    out.fill_(float("nan"))
    x.copy_(_x(16, k, torch.bfloat16, seed=7))
    graph.replay()
    torch.cuda.synchronize()
    _check(out, _ref(x, w), torch.bfloat16, "graph replay")


def test_fallbacks():
    # K = 80 is not a multiple of the kernel's K tile: the op must run the layout's PyTorch
    # dequantization instead. Same for float32 activations. The "nk" layout goes to the
    # reference.
    n, k = 32, 80
    q, s, z, w = _problem(n, k, 8, True, k, "none", seed=3)
    assert mg.select_layout(8, True, k, "none", n, k, torch.bfloat16, "cuda") is None
    qw, sc, zz = mg.prepare_weight(q.cuda(), s.cuda(), None, 8, True, k, "none",
                                   mg.LAYOUT_ROWSCALE, torch.bfloat16)
    x = _x(5, k, torch.bfloat16)
    assert not mg.supports(x, qw, sc, 8, k, mg.LAYOUT_ROWSCALE)
    out = torch.ops.qcompile.mixed_gemm(x, qw, sc, zz, None, 8, True, k, "none",
                                        "bfloat16", mg.LAYOUT_ROWSCALE)
    _check(out, _ref(x, w), torch.bfloat16, "fallback K=80")
    n, k = 64, 256
    layout, qw, sc, zz, w = _prepared(n, k, 4, False, 128, "sub", "bf16")
    x32 = torch.randn(3, k, device="cuda")
    out = torch.ops.qcompile.mixed_gemm(x32, qw, sc, zz, None, 4, False, 128, "sub",
                                        "float32", layout)
    err = ((out.double().cpu() - _ref(x32, w)).norm() / _ref(x32, w).norm()).item()
    assert err < 1e-2, err  # scales/zeros were stored in bf16
    q, s, z, w = _problem(n, k, 4, False, 128, "sub", seed=4)
    out = torch.ops.qcompile.mixed_gemm(x32.to(torch.bfloat16), ops.pack_nk(q, 4).cuda(), s.cuda(),
                                        z.cuda(), None, 4, False, 128, "sub", "float32", "nk")
    _check(out, _ref(x32.to(torch.bfloat16), w), torch.bfloat16, "nk layout via reference")


def test_bad_inputs_raise():
    n, k = 64, 256
    layout, qw, sc, zz, w = _prepared(n, k, 4, False, 128, "sub", "bf16")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mg.mixed_gemm_cuda(torch.randn(2, k, device="cuda"), qw, sc, zz, None, 4, False, 128,
                           "sub", layout)
    with pytest.raises(ValueError, match="qweight"):
        mg.mixed_gemm_cuda(_x(2, k, torch.bfloat16), qw[:, :64], sc, zz, None, 4, False, 128,
                           "sub", layout)
    with pytest.raises(ValueError, match="group_size"):
        mg.mixed_gemm_cuda(_x(2, k, torch.bfloat16), qw, sc, zz, None, 4, False, 32, "sub", layout)


@pytest.mark.parametrize("act,bits", [("bf16", 4), ("fp16", 4), ("bf16", 8), ("fp16", 8)])
def test_reorder_matches_cute(act, bits):
    # The torch reorder must equal the CuTe layout the kernel reads (host function in the lib).
    cfg = next(c for c in mg.CONFIGS if (c.act, c.bits) == (act, bits))
    n, k = 48, 320
    offs = torch.empty(n * k, dtype=torch.int64)
    assert mg._lib(cfg).qc_mixed_gemm_sm90_offsets(n, k, ctypes.c_void_p(offs.data_ptr())) == 0
    order = mg.kernel_order(torch.arange(n * k).reshape(n, k), bits)
    mine = torch.empty(n * k, dtype=torch.int64)
    mine[order] = torch.arange(n * k)
    assert torch.equal(mine, offs)
