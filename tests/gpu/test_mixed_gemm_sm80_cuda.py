"""GPU tests of the Ampere-class CUTLASS 2.x mixed-input GEMM (qcompile.kernels.mixed_gemm_sm80)
against float64.

The kernel runs signed int8 per-channel weights (layout sm80_mixed_v1_rowscale) with bf16 /
fp16 activations; its sm_80 code runs on compute capability 8.x and, built as sm_90 machine
code, on an H100. Covered: both activation types, odd M (1, 3, 17, 100), N and K at their
alignment limits, every configuration in its data-parallel, split-K and stream-K modes,
bias, 3-D inputs, CUDA-graph capture, the dispatch of the family's op implementation
(kernel, PyTorch fallback for the group-wise layout and for inputs the kernel refuses,
hand-over of other layouts). Outputs are NaN-poisoned before every kernel call.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from qcompile.kernels import mixed_gemm_sm80 as m80  # noqa: E402
from qcompile.kernels import ops  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
ACTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def _ampere_or_hopper():
    cap = torch.cuda.get_device_capability()
    if not (cap[0] == 8 or cap == (9, 0)):
        pytest.skip(f"sm_80/sm_90 machine code only; device is {cap}")
    m80.build_all()


def _problem(n, k, seed):
    """Signed int8 per-channel weight, float32 scales [N, 1] and the float64 weight."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int16).to(torch.int8)
    # scales spread over a decade so that a channel mix-up shows in the error
    s = (torch.rand(n, 1, generator=g) * 0.9 + 0.1) / 128
    return q, s, q.double() * s.double()


def _prepared(n, k, act, seed=0):
    q, s, w = _problem(n, k, seed)
    layout = m80.select_layout(8, True, k, "none", n, k, ACTS[act], "cuda")
    assert layout == m80.LAYOUT_ROWSCALE
    qw, sc, zz = m80.prepare_weight(q.cuda(), s.cuda(), None, 8, True, k, "none", layout, ACTS[act])
    assert zz is None
    return layout, qw, sc, w


def _x(m, k, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, k, device="cuda", generator=g).to(dtype)


def _ref(x, w, bias=None):
    out = x.double().cpu() @ w.t()
    if bias is not None:
        out = out + bias.double().cpu()
    return out


def _check(out, ref, dtype, what):
    assert out.dtype == dtype and tuple(out.shape) == tuple(ref.shape), what
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN) or non-finite outputs"
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], f"{what}: relative L2 error {err:.2e} > {TOL[dtype]:.0e}"


def _run(x, qw, sc, layout, bias=None, config=None):
    m, n = x.shape[0], qw.shape[0]
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
    res = m80.mixed_gemm_sm80_cuda(x, qw, sc, None, bias, 8, True, x.shape[-1], "none", layout,
                                   config=config, out=out)
    torch.cuda.synchronize()
    assert res.data_ptr() == out.data_ptr()
    return out


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_rowscale(act, with_bias):
    n, k, m = 256, 512, 17
    layout, qw, sc, w = _prepared(n, k, act)
    x = _x(m, k, ACTS[act])
    bias = torch.randn(n, device="cuda").to(ACTS[act]) if with_bias else None
    _check(_run(x, qw, sc, layout, bias), _ref(x, w, bias), ACTS[act], f"{act} bias={with_bias}")


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("m", [1, 3, 17, 100])
def test_odd_m(act, m):
    n, k = 512, 1024
    layout, qw, sc, w = _prepared(n, k, act)
    x = _x(m, k, ACTS[act])
    _check(_run(x, qw, sc, layout), _ref(x, w), ACTS[act], f"{act} M={m}")


@pytest.mark.parametrize("n,k", [(8, 16), (24, 48), (136, 272), (4104, 128)])
def test_alignment_limits(n, k):
    layout, qw, sc, w = _prepared(n, k, "bf16")
    for m in (1, 33):
        x = _x(m, k, torch.bfloat16)
        _check(_run(x, qw, sc, layout), _ref(x, w), torch.bfloat16, f"N={n} K={k} M={m}")


def _choices(cfg):
    return [m80.Choice(cfg, m80.DECOMP_DATA_PARALLEL, 1), m80.Choice(cfg, m80.DECOMP_SPLIT_K, 3),
            m80.Choice(cfg, m80.DECOMP_STREAM_K, 1), m80.Choice(cfg, m80.DECOMP_HEURISTIC, 1)]


@pytest.mark.parametrize("cfg", m80.CONFIGS, ids=m80.config_name)
def test_every_config(cfg):
    n, k = 384, 1024
    dtype = ACTS[cfg.act]
    layout, qw, sc, w = _prepared(n, k, cfg.act)
    bias = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    bias = bias.to(dtype)
    for m in (1, 33, 130):
        x = _x(m, k, dtype)
        ref = _ref(x, w, bias)
        for choice in _choices(cfg):
            _check(_run(x, qw, sc, layout, bias, choice), ref, dtype,
                   f"{m80.config_name(cfg)} M={m} {choice}")


def test_heuristic_shapes():
    n, k = 4096, 1024
    layout, qw, sc, w = _prepared(n, k, "bf16")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in (1, 16, 32, 64, 256, 300):
        x = _x(m, k, torch.bfloat16)
        _check(_run(x, qw, sc, layout), _ref(x, w), torch.bfloat16,
               f"M={m} {m80.choose_config(m, n, k, 'bf16', sms)}")


def test_3d_input_and_dispatch():
    # the family's op implementation: kernel for its kernel layout (3-D x, bias) ...
    n, k = 256, 512
    layout, qw, sc, w = _prepared(n, k, "bf16")
    x = _x(10, k, torch.bfloat16).reshape(2, 5, k)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = m80._cuda_impl(x, qw, sc, None, bias, 8, True, k, "none", torch.bfloat16, layout)
    assert out.shape == (2, 5, n)
    _check(out.reshape(10, n), _ref(x.reshape(10, k), w, bias), torch.bfloat16, "3-D x")
    # ... PyTorch for the group-wise layout (no kernel yet) ...
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int16)
    s = torch.rand(n, k // 128, generator=g) + 0.1
    z = torch.randint(0, 16, (n, k // 128), generator=g).float()
    assert m80.select_layout(4, False, 128, "sub", n, k, torch.bfloat16, "cuda") is None
    qg, sg, zg = m80.prepare_weight(q.cuda(), s.cuda(), z.cuda(), 4, False, 128, "sub",
                                    m80.LAYOUT_GROUPZERO, torch.bfloat16)
    wg = ((q.double() - z.double().repeat_interleave(128, 1)) * s.double().repeat_interleave(128, 1))
    x2 = x.reshape(10, k)
    out = m80._cuda_impl(x2, qg, sg, zg, None, 4, False, 128, "sub", torch.bfloat16,
                         m80.LAYOUT_GROUPZERO)
    _check(out, _ref(x2, wg), torch.bfloat16, "groupzero via PyTorch")
    # ... and the reference "nk" layout is handed over (to the Hopper family's impl)
    out = m80._cuda_impl(x2, ops.pack_nk(q, 4).cuda(), s.cuda(), z.cuda(), None, 4, False, 128,
                         "sub", torch.bfloat16, "nk")
    _check(out, _ref(x2, wg), torch.bfloat16, "nk layout")


def test_fallback_for_refused_inputs():
    # float32 activations and unaligned K are not the kernel's: the impl runs PyTorch
    n, k = 32, 40
    q, s, w = _problem(n, k, seed=4)
    qw, sc, _ = m80.prepare_weight(q.cuda(), s.cuda(), None, 8, True, k, "none",
                                   m80.LAYOUT_ROWSCALE, torch.bfloat16)
    x = _x(3, k, torch.bfloat16)
    assert not m80.supports(x, qw, sc, 8, k, m80.LAYOUT_ROWSCALE)
    out = m80._cuda_impl(x, qw, sc, None, None, 8, True, k, "none", torch.bfloat16,
                         m80.LAYOUT_ROWSCALE)
    _check(out, _ref(x, w), torch.bfloat16, "K=40 fallback")
    x32 = torch.randn(3, k, device="cuda")
    out = m80._cuda_impl(x32, qw, sc, None, None, 8, True, k, "none", torch.float32,
                         m80.LAYOUT_ROWSCALE)
    err = ((out.double().cpu() - _ref(x32, w)).norm() / _ref(x32, w).norm()).item()
    assert err < 1e-2, err


def test_cuda_graph():
    n, k = 1024, 1024
    layout, qw, sc, w = _prepared(n, k, "bf16")
    x = _x(16, k, torch.bfloat16)
    m80.mixed_gemm_sm80_cuda(x, qw, sc, None, None, 8, True, k, "none", layout)  # load the lib
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m80.mixed_gemm_sm80_cuda(x, qw, sc, None, None, 8, True, k, "none", layout)
    out.fill_(float("nan"))
    x.copy_(_x(16, k, torch.bfloat16, seed=7))
    graph.replay()
    torch.cuda.synchronize()
    _check(out, _ref(x, w), torch.bfloat16, "graph replay")


def test_bad_inputs_raise():
    n, k = 64, 256
    layout, qw, sc, w = _prepared(n, k, "bf16")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        m80.mixed_gemm_sm80_cuda(torch.randn(2, k, device="cuda"), qw, sc, None, None, 8, True, k,
                                 "none", layout)
    with pytest.raises(ValueError, match="qweight"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, torch.bfloat16), qw[:, :64], sc, None, None, 8, True, k,
                                 "none", layout)
    with pytest.raises(ValueError, match="no kernel"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, torch.bfloat16), qw, sc, None, None, 8, True, k,
                                 "none", m80.LAYOUT_GROUPZERO)
    fp16_cfg = next(c for c in m80.CONFIGS if c.act == "fp16")
    with pytest.raises(ValueError, match="is for fp16"):
        m80.mixed_gemm_sm80_cuda(_x(2, k, torch.bfloat16), qw, sc, None, None, 8, True, k,
                                 "none", layout, config=fp16_cfg)
