"""GPU tests of the Ampere-class mixed-input GEMMs (qcompile.kernels.mixed_gemm_sm80) against
float64 references computed from ``ops.dequantize`` of the original (q, scales, zeros).

Two kernels: the CUTLASS 2.x rowscale kernel (signed int8 per-channel, layout
sm80_mixed_v1_rowscale) and the group-wise kernel (int4 / int8, scales + zeros in the main
loop, layout sm80_mixed_v2_groupzero). Both are sm_80 code; on an H100 they run as sm_90
machine code built from the same PTX. Covered: every supported format (int4 unsigned with
zeros g64 / g128 / g32, int4 signed symmetric g128 / g16, int8 per-channel signed and
unsigned, int8 group-wise), bf16 and fp16, odd M (1, 3, 17, 100) and M = 2048, N and K at
the alignment limits, every config and every candidate choice name, bias, 3-D inputs,
CUDA-graph capture (split-K included), the op body ``kernels.run_family`` (kernel, choice tables,
PyTorch fallbacks) and the refusals. Outputs are NaN-poisoned before every kernel call.

Run: ``python -m pytest -q -m gpu tests/gpu/test_mixed_gemm_sm80_cuda.py`` (builds the
kernels on first use: nvcc + nvidia-cutlass, or a prebuilt $QCOMPILE_CACHE_DIR).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from qcompile.kernels import mixed_gemm_sm80 as m80  # noqa: E402
from qcompile.kernels import ops, run_family  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
ACTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def _ampere_or_hopper():
    cap = torch.cuda.get_device_capability()
    if not (cap[0] == 8 or cap == (9, 0)):
        pytest.skip(f"sm_80/sm_90 machine code only; device is {cap}")
    m80.build_all()


# (bits, signed, group (0 = per-channel, K), zero_mode)
FORMATS = [
    (4, False, 64, "sub"),    # AWQ / GPTQ style
    (4, False, 128, "sub"),
    (4, False, 128, "add"),
    (4, False, 32, "sub"),
    (4, True, 128, "none"),   # signed symmetric
    (4, True, 16, "none"),
    (8, True, 0, "none"),     # per-channel signed: rowscale (CUTLASS)
    (8, False, 0, "sub"),     # per-channel unsigned with zeros: group-wise kernel, g = K
    (8, True, 128, "none"),
    (8, False, 64, "sub"),
]


def _fmt_id(f):
    bits, signed, group, zm = f
    return f"w{bits}{'s' if signed else 'u'}-g{group or 'K'}-{zm}"


def _problem(n, k, bits, signed, group, zero_mode, act, seed=0):
    """Random q, scales (representable in act), zeros and the float64 weight [N, K] on GPU."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int16)
    groups = k // group
    # scales spread over a decade so that a channel / group mix-up shows in the error
    s = ((torch.rand(n, groups, generator=g) * 0.9 + 0.1) * 8 / (1 << bits)).to(act).float()
    z = None
    if zero_mode == "sub":
        z = torch.randint(lo, hi, (n, groups), generator=g).float()
    elif zero_mode == "add":
        z = torch.randn(n, groups, generator=g) * 0.1
    w = ops.dequantize(ops.pack_nk(q, bits), s.double(), None if z is None else z.double(), bits,
                       signed, group, zero_mode, torch.float64)
    return q, s, z, w.cuda()


def _prepared(n, k, fmt, act, seed=0, expect=None):
    bits, signed, group, zero_mode = fmt
    group = group or k
    q, s, z, w = _problem(n, k, bits, signed, group, zero_mode, ACTS[act], seed)
    layout = m80.select_layout(bits, signed, group, zero_mode, n, k, ACTS[act], "cuda")
    if expect is None:
        expect = m80.LAYOUT_ROWSCALE if (bits, signed, group, zero_mode) == (8, True, k, "none") \
            else m80.LAYOUT_GROUPZERO_V2
    assert layout == expect, (fmt, n, k, layout)
    qw, sc, zz = m80.prepare_weight(q.cuda(), s.cuda(), None if z is None else z.cuda(), bits,
                                    signed, group, zero_mode, layout, ACTS[act])
    return dict(layout=layout, qweight=qw, scales=sc, zeros=zz, bits=bits, signed=signed,
                group=group, zero_mode=zero_mode, w=w)


def _x(m, k, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, k, device="cuda", generator=g).to(dtype)


def _ref(x, w, bias=None):
    out = x.double() @ w.t()
    if bias is not None:
        out = out + bias.double()
    return out


def _check(out, ref, dtype, what):
    assert out.dtype == dtype and tuple(out.shape) == tuple(ref.shape), what
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN) or non-finite outputs"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], f"{what}: relative L2 error {err:.2e} > {TOL[dtype]:.0e}"


def _run(x, p, bias=None, config=None):
    m, n = x.shape[0], p["qweight"].shape[0]
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
    res = m80.mixed_gemm_sm80_cuda(x, p["qweight"], p["scales"], p["zeros"], bias, p["bits"],
                                   p["signed"], p["group"], p["zero_mode"], p["layout"],
                                   config=config, out=out)
    torch.cuda.synchronize()
    assert res.data_ptr() == out.data_ptr()
    return out


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_formats_odd_m(fmt, act):
    n, k = 384, 1024
    p = _prepared(n, k, fmt, act)
    for m in (1, 3, 17, 100):
        x = _x(m, k, ACTS[act], seed=m)
        _check(_run(x, p), _ref(x, p["w"]), ACTS[act], f"{_fmt_id(fmt)} {act} M={m}")


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[4], FORMATS[6], FORMATS[9]], ids=_fmt_id)
def test_large_m(fmt, act):
    n, k = 1024, 2048
    p = _prepared(n, k, fmt, act, seed=2)
    x = _x(2048, k, ACTS[act])
    bias = torch.randn(n, device="cuda").to(ACTS[act])
    _check(_run(x, p, bias), _ref(x, p["w"], bias), ACTS[act], f"{_fmt_id(fmt)} {act} M=2048")


# (format, N, K): the smallest and odd multiples of each kernel's alignment
# (group-wise: K % 64, N % 16 int4 / N % 8 int8; rowscale: N % 8, K % 16)
LIMITS = [
    ((4, False, 64, "sub"), 16, 64), ((4, False, 64, "sub"), 48, 192),
    ((4, True, 32, "none"), 144, 320), ((4, False, 128, "sub"), 4112, 128),
    ((8, False, 64, "sub"), 8, 64), ((8, True, 16, "none"), 24, 128), ((8, False, 0, "add"), 136, 64),
    ((8, True, 0, "none"), 8, 16), ((8, True, 0, "none"), 24, 48), ((8, True, 0, "none"), 136, 272),
]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("fmt,n,k", LIMITS)
def test_alignment_limits(fmt, n, k, act):
    p = _prepared(n, k, fmt, act)
    for m in (1, 33):
        x = _x(m, k, ACTS[act])
        _check(_run(x, p), _ref(x, p["w"]), ACTS[act], f"{_fmt_id(fmt)} N={n} K={k} M={m}")


def _every_choice(cfg):
    sk = [m80.Choice(cfg, m80.DECOMP_DATA_PARALLEL, 1), m80.Choice(cfg, m80.DECOMP_SPLIT_K, 3),
          m80.Choice(cfg, m80.DECOMP_SPLIT_K, 16)]
    if cfg.mode == "rs":
        sk += [m80.Choice(cfg, m80.DECOMP_STREAM_K, 1), m80.Choice(cfg, m80.DECOMP_HEURISTIC, 1)]
    return sk


@pytest.mark.parametrize("cfg", m80.CONFIGS, ids=m80.config_name)
def test_every_config(cfg):
    n, k = 384, 1024
    fmt = (8, True, 0, "none") if cfg.mode == "rs" else (cfg.bits, False, 128, "sub")
    p = _prepared(n, k, fmt, cfg.act, seed=3)
    dtype = ACTS[cfg.act]
    bias = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    bias = bias.to(dtype)
    for m in (1, 33, 130):
        x = _x(m, k, dtype)
        ref = _ref(x, p["w"], bias)
        for choice in _every_choice(cfg):
            name = m80.choice_name(choice)
            _check(_run(x, p, bias, choice), ref, dtype, f"{name} M={m}")
            _check(_run(x, p, bias, name), ref, dtype, f"{name} by name M={m}")


@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[6], FORMATS[8]], ids=_fmt_id)
def test_candidates_run_and_agree(fmt):
    n, k = 4096, 1024
    act = "bf16"
    p = _prepared(n, k, fmt, act, seed=4)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in (1, 16, 64, 300):
        x = _x(m, k, torch.bfloat16)
        ref = _ref(x, p["w"])
        names = m80.candidates(m, n, k, act, p["bits"], p["group"], p["layout"], sms)
        assert len(set(names)) == len(names)
        # at most 8 GEMM choices, plus the decode kernel's launch shapes at m <= 32
        assert 1 <= len([c for c in names if not c.startswith("decode.")]) <= 8
        decodable = p["layout"] == m80.LAYOUT_GROUPZERO_V2 and p["group"] % 64 == 0
        assert any(c.startswith("decode.") for c in names) == (m <= 32 and decodable)
        outs = []
        for name in names:
            assert m80.choice_name(m80.choice_from_name(name)) == name
            out = _run(x, p, None, name)
            _check(out, ref, torch.bfloat16, f"{name} M={m}")
            outs.append(out)
        for name, out in zip(names[1:], outs[1:]):
            diff = ((out.double() - outs[0].double()).norm() / ref.norm()).item()
            assert diff <= TOL[torch.bfloat16], f"{name} vs {names[0]} M={m}: {diff:.2e}"


def test_heuristic_shapes():
    n, k = 4096, 1024
    p = _prepared(n, k, (4, False, 128, "sub"), "bf16")
    for m in (1, 16, 32, 64, 256, 300):
        x = _x(m, k, torch.bfloat16)
        _check(_run(x, p), _ref(x, p["w"]), torch.bfloat16, f"M={m}")


def test_run_body_3d_bias_tables_and_fallbacks():
    n, k = 256, 512
    fmt = (4, False, 128, "sub")
    p = _prepared(n, k, fmt, "bf16")
    args = (p["qweight"], p["scales"], p["zeros"])
    fmt_args = (p["bits"], p["signed"], p["group"], p["zero_mode"], torch.bfloat16, p["layout"])
    x = _x(10, k, torch.bfloat16).reshape(2, 5, k)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    ref = _ref(x.reshape(10, k), p["w"], bias)
    out = run_family(m80, x, *args, bias, *fmt_args)
    assert out.shape == (2, 5, n)
    _check(out.reshape(10, n), ref, torch.bfloat16, "run, heuristic, 3-D x")
    names = m80.candidates(10, n, k, "bf16", 4, 128, p["layout"], 132)
    table = f"1-8:{names[-1]},9-:{names[0]}"
    for config in (names[0], table):
        out = run_family(m80, x, *args, bias, *fmt_args, config=config)
        _check(out.reshape(10, n), ref, torch.bfloat16, f"run config={config}")
    # float32 activations are not the kernel's: the PyTorch fallback
    x32 = torch.randn(3, k, device="cuda")
    out = run_family(m80, x32, *args, None, *fmt_args)
    err = ((out.double() - _ref(x32, p["w"])).norm() / _ref(x32, p["w"]).norm()).item()
    assert err < 1e-2, err
    # the legacy v1 group-wise layout still runs (PyTorch)
    q, s, z, w = _problem(n, k, 4, False, 128, "sub", torch.bfloat16, seed=0)
    qg, sg, zg = m80.prepare_weight(q.cuda(), s.cuda(), z.cuda(), 4, False, 128, "sub",
                                    m80.LAYOUT_GROUPZERO, torch.bfloat16)
    out = run_family(m80, x.reshape(10, k), qg, sg, zg, None, 4, False, 128, "sub", torch.bfloat16,
                  m80.LAYOUT_GROUPZERO)
    _check(out, _ref(x.reshape(10, k), w), torch.bfloat16, "v1 groupzero via PyTorch")


@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[6]], ids=_fmt_id)
def test_cuda_graph(fmt):
    n, k = 1024, 2048
    p = _prepared(n, k, fmt, "bf16")
    x = _x(16, k, torch.bfloat16)
    name = m80.choice_name(m80.choose_config(16, n, k, "bf16", 132, p["bits"],
                                             "rs" if p["layout"] == m80.LAYOUT_ROWSCALE else "gz"))
    sk = name.split("/")[0] + "/sk4"  # split-K: the counter memset is captured too
    for config in (name, sk):
        args = (p["qweight"], p["scales"], p["zeros"], None, p["bits"], p["signed"], p["group"],
                p["zero_mode"], p["layout"], config)
        m80.mixed_gemm_sm80_cuda(x, *args)  # load the library
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m80.mixed_gemm_sm80_cuda(x, *args)
        for seed in (7, 8):
            out.fill_(float("nan"))
            x.copy_(_x(16, k, torch.bfloat16, seed=seed))
            graph.replay()
            torch.cuda.synchronize()
            _check(out, _ref(x, p["w"]), torch.bfloat16, f"graph replay {config} seed={seed}")


def test_unsupported_shapes():
    dev = "cuda"
    bf = torch.bfloat16
    # K not a multiple of 64 (group-wise) / 16 (rowscale), N not a multiple of 16 for int4,
    # group sizes the kernel does not take: no layout
    assert m80.select_layout(4, False, 32, "sub", 256, 96, bf, dev) is None
    assert m80.select_layout(4, False, 64, "sub", 24, 128, bf, dev) is None
    assert m80.select_layout(4, False, 48, "sub", 256, 192, bf, dev) is None
    assert m80.select_layout(8, True, 40, "none", 256, 40, bf, dev) is None
    assert m80.select_layout(8, True, 128, "none", 256, 128, torch.float32, dev) is None
    # and the kernel call refuses them with a clear error
    n, k = 32, 96
    qw = torch.zeros(n, k // 2, dtype=torch.uint8, device=dev)
    s = torch.ones(k // 32, n, dtype=bf, device=dev)
    with pytest.raises(ValueError, match="K=96 must be a multiple of 64"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, bf), qw, s, s, None, 4, False, 32, "sub",
                                 m80.LAYOUT_GROUPZERO_V2)
    with pytest.raises(ValueError):
        m80.prepare_weight(torch.zeros(n, k, dtype=torch.int16), torch.ones(n, 3), None, 4, True,
                           32, "none", m80.LAYOUT_GROUPZERO_V2, bf)


def test_bad_inputs_raise():
    n, k = 64, 256
    p = _prepared(n, k, (4, False, 128, "sub"), "bf16")
    args = (p["qweight"], p["scales"], p["zeros"], None, 4, False, 128, "sub")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        m80.mixed_gemm_sm80_cuda(torch.randn(2, k, device="cuda"), *args, p["layout"])
    with pytest.raises(ValueError, match="qweight"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, torch.bfloat16), p["qweight"][:, :64], *args[1:],
                                 p["layout"])
    with pytest.raises(ValueError, match="no kernel"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, torch.bfloat16), *args, m80.LAYOUT_GROUPZERO)
    with pytest.raises(ValueError, match="is for fp16"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, torch.bfloat16), *args, p["layout"],
                                 config="sm80.fp16.w4.gz.16x128x64.s4/dp")
    with pytest.raises(ValueError, match="does not run"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, torch.bfloat16), *args, p["layout"],
                                 config="sm80.bf16.w8.gz.16x128x64.s4/dp")
    with pytest.raises(ValueError, match="no sm80 mixed-GEMM choice"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, torch.bfloat16), *args, p["layout"], config="bogus")
