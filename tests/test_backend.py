"""torch.compile(backend="qcompile") on every format x dtype x freezing x static/dynamic M.

Each case checks the numbers against eager, the exact match count and formats, that the
post-grad graph calls qcompile ops instead of aten matmuls, that no float copy of a
quantized weight is held as a constant, and (dynamic) that new M values do not recompile.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TOL, rel_err
from torch import nn

import qcompile
from qcompile.formats import SmoothQuantLinear

QC_OPS = (torch.ops.qcompile.mixed_gemm.default, torch.ops.qcompile.mixed_gemm_gated.default,
          torch.ops.qcompile.mixed_gemm_norm_out.default, torch.ops.qcompile.int8_gemm.default,
          torch.ops.qcompile.lut_gemm.default, torch.ops.qcompile.lut_gemm_gated.default,
          torch.ops.qcompile.lut_gemm_norm_out.default)
ATEN_MMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
            torch.ops.aten._int_mm.default, torch.ops.aten.bmm.default)

# name -> (quantize kwargs, expected format of the two linears)
FORMATS = {
    "w8a16": (dict(method="w8a16"), "w8a16 int8 per-channel"),
    "w8a16_post": (dict(method="w8a16", style="post"), "w8a16 int8 per-channel post-scale"),
    "w4a16_uint8_zp": (dict(method="w4a16", packing="uint8"), "w4a16 uint4 g64+zeros"),
    "w4a16_uint8_sym": (dict(method="w4a16", packing="uint8", zero_point=False),
                        "w4a16 int4 g64"),
    "w4a16_awq_zp": (dict(method="w4a16", packing="awq"), "w4a16 uint4 g64+zeros"),
    "w4a16_awq_sym": (dict(method="w4a16", packing="awq", zero_point=False), "w4a16 int4 g64"),
    "w4a16_gptq_zp": (dict(method="w4a16", packing="gptq"), "w4a16 uint4 g64+zeros"),
    "w4a16_gptq_sym": (dict(method="w4a16", packing="gptq", zero_point=False), "w4a16 int4 g64"),
    "w8a8_dynamic": (dict(method="w8a8"), "w8a8 int8 per-token x per-channel"),
    "w8a8_static": (dict(method="w8a8", act="static"), "w8a8 int8 per-tensor x per-channel"),
    "w8a8_smooth": ("smooth", "w8a8 int8 per-token x per-channel"),
    "w8a8_asym": (dict(method="w8a8", act="dynamic_asym"),
                  "w8a8 int8 per-token asymmetric x per-channel"),
}


def make_model(fmt: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64, bias=False)).to(dtype)
    kwargs = FORMATS[fmt][0]
    if kwargs == "smooth":
        for i in (0, 2):
            smooth = torch.rand(m[i].in_features) + 0.5
            m[i] = SmoothQuantLinear.from_linear(m[i], smooth=smooth)
        return m
    kwargs = dict(kwargs, group_size=64)
    if kwargs.get("act") == "static":
        kwargs["calibration"] = [torch.randn(8, 256, dtype=dtype)]
    return qcompile.quantize(m, **kwargs)


class GraphSpy:
    """Records the post-grad graph Inductor compiles (after our pass and freezing)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        gm = graph.owning_module
        consts = {}
        for n in graph.nodes:
            if n.op == "get_attr":
                consts[n.target] = getattr(gm, n.target)
        self.graphs.append(([n.target for n in graph.nodes if n.op == "call_function"],
                            consts))

    @contextlib.contextmanager
    def installed(self):
        with torch._inductor.config.patch(post_grad_custom_post_pass=self):
            yield self


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("freezing", [True, False], ids=["freeze", "nofreeze"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_compile_matches_eager_and_rewrites(fmt, dtype, freezing, dynamic):
    model = make_model(fmt, dtype)
    spy = GraphSpy()
    compiled = torch.compile(model, backend="qcompile", dynamic=dynamic,
                             options={"freezing": freezing})
    # Dynamo specializes sizes 0 and 1, so the dynamic M values avoid them.
    shapes = [(2, 5, 256), (3, 7, 256), (4, 3, 256)] if dynamic else [(2, 5, 256)]
    with torch.no_grad(), qcompile.collect() as report, spy.installed():
        for shape in shapes:
            x = torch.randn(*shape, dtype=dtype)
            out = compiled(x)
            assert out.shape == (*shape[:-1], 64)
            assert rel_err(out, model(x)) <= TOL[dtype], f"shape {shape}"
    # one compile for every M (dynamic), two linears, both matched with the right format
    assert [r.matched for r in report.records] == [True, True], str(report)
    assert {r.format.replace(" +bias", "") for r in report.records} == {FORMATS[fmt][1]}
    assert len(spy.graphs) == 1
    targets, consts = spy.graphs[0]
    assert sum(t in QC_OPS for t in targets) == 2
    assert not any(t in ATEN_MMS for t in targets)
    smallest_weight = 64 * 128
    floats = {k: tuple(v.shape) for k, v in consts.items()
              if v.is_floating_point() and v.numel() >= smallest_weight}
    assert not floats, f"float constants as large as a weight: {floats}"
    if fmt.startswith("w8a8") or fmt == "w8a16":
        # the model's own int8 [N, K] tensors serve the kernels: no second copy
        copies = [k for k in consts if k.startswith(("_qcompile_wq", "_qcompile_qweight"))]
        assert not copies, copies


class WideZeroPointCorrection(nn.Module):
    """An asymmetric W8A8 linear whose zero-point correction is computed in int64: not the
    int32 correction the kernels apply, so it must stay unmatched, with the reason."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("wq", torch.randint(-127, 128, (64, 256), dtype=torch.int8))
        self.register_buffer("colsum", self.wq.sum(dim=1))  # int64

    def forward(self, x):
        xq = torch.round(x * 20).clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.wq.t()) - torch.full_like(x[:, :1], 3).long() * self.colsum
        return acc.float() * 0.05


def test_zero_point_correction_outside_int32_is_not_matched():
    model = WideZeroPointCorrection()
    x = torch.randn(5, 256)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert [r.matched for r in report.records] == [False]
    assert "zero-point correction computed in torch.int64" in report.records[0].reason
    assert torch.allclose(out, model(x))


class Uint8ShiftedW8A8(nn.Module):
    """W8A8 spelled for CPU int8 GEMMs (uint8 x int8), as torchao 0.18's Int8Tensor does on
    CPU: _int_mm((xq + 128) as uint8, wq.T) - 128 x the weight's column sums, then the
    rescale. ``shift`` / ``correction`` other than 128 make near misses."""

    def __init__(self, shift=128, correction=128):
        super().__init__()
        torch.manual_seed(0)
        self.shift, self.correction = shift, correction
        self.register_buffer("wq", torch.randint(-127, 128, (64, 256), dtype=torch.int8))
        self.register_buffer("s", torch.rand(64) * 0.01 + 0.001)

    def forward(self, x):
        sx = x.abs().amax(-1, keepdim=True).clamp(min=1e-6) / 127
        xq = torch.round(x / sx).clamp(-128, 127).to(torch.int8)
        xu = (xq.to(torch.int32) + self.shift).to(torch.uint8)
        wt = self.wq.t()
        acc = torch._int_mm(xu, wt) - wt.sum(0, keepdim=True, dtype=torch.int32) * self.correction
        return (acc.to(torch.float32) * sx * self.s).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_uint8_shifted_activation_is_int8_w8a8(dtype):
    """The +128 shift and its correction cancel: one int8_gemm of the int8 activation, with
    the model's numbers; another shift, or a correction that does not undo it, stays
    unmatched, with why."""
    model = Uint8ShiftedW8A8()
    x = torch.randn(9, 256, dtype=dtype)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert [r.matched for r in report.records] == [True], str(report)
    assert report.records[0].format == "w8a8 int8 per-token x per-channel"
    assert rel_err(out, model(x)) <= TOL[dtype]
    for shift, correction, why in ((128, 127, "minus something other than 128 x the weight's"),
                                   (127, 127, "uint8 activation that is not an int8 one plus 128")):
        torch._dynamo.reset()
        near = Uint8ShiftedW8A8(shift, correction)
        with torch.no_grad(), qcompile.collect() as report:
            torch.compile(near, backend="qcompile")(x)  # left to Inductor as it is
        assert [r.matched for r in report.records] == [False]
        assert why in report.records[0].reason, report.records[0].reason


class BroadcastMatmul(nn.Module):
    """matmul of a non-contiguous 3-D activation with a dequantized [K, N] weight: Inductor
    sees bmm(x, expand(W)), not mm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("q", torch.randint(-127, 128, (64, 32), dtype=torch.int8))
        self.register_buffer("s", torch.rand(32) + 0.01)

    def forward(self, x):
        return torch.matmul(x.transpose(0, 1), self.q.to(x.dtype) * self.s.to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bmm_with_a_broadcast_weight_is_rewritten(dtype):
    model = BroadcastMatmul()
    x = torch.randn(5, 3, 64, dtype=dtype)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert [(r.op, r.matched, r.format) for r in report.records] == [
        ("bmm", True, "w8a16 int8 per-channel")]
    assert rel_err(out, model(x)) <= TOL[dtype]


def test_discard_parameters_frees_the_replaced_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128))
    qcompile.quantize(model, "w4a16", group_size=64)
    x = torch.randn(4, 256)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="qcompile",
                                 options={"freezing_discard_parameters": True})
        out = compiled(x)
        assert rel_err(out, ref) <= 1e-5
        # the user's scales/zeros were repacked into the graph, then freed
        released = [name for name, t in model.named_buffers() if t.untyped_storage().nbytes() == 0]
        assert {"0.scales", "0.zeros", "2.scales", "2.zeros"} <= set(released), released
        assert rel_err(compiled(x), ref) <= 1e-5  # the compiled model still runs
        with pytest.raises(Exception, match="freezing_discard_parameters"):
            compiled(torch.randn(4, 7, 256))  # a retrace needs the released weights


def test_discard_parameters_needs_freezing():
    model = nn.Sequential(nn.Linear(64, 64))
    compiled = torch.compile(model, backend="qcompile",
                             options={"freezing": False, "freezing_discard_parameters": True})
    with pytest.raises(Exception, match="needs freezing"):
        compiled(torch.randn(2, 64))


@pytest.mark.parametrize("options, expected", [({}, True), ({"combo_kernels": False}, False)])
def test_combo_kernels_default_and_override(monkeypatch, options, expected):
    """The backend compiles with Inductor's combo_kernels on unless the user turns it off."""
    import torch._inductor.compile_fx as compile_fx_module
    seen = []
    real = compile_fx_module.compile_fx

    def spy(*args, **kwargs):
        seen.append(torch._inductor.config.combo_kernels)
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 32))
    qcompile.quantize(model, "w8a16")
    x = torch.randn(2, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile", options=options)(x)
        assert rel_err(out, model(x)) <= 1e-5
    assert seen == [expected]
    assert torch._inductor.config.combo_kernels is False  # only inside the compile
