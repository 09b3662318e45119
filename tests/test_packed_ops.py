"""The library ops that hide the dequantization (lowering/packed_ops.py), on CPU.

gpt-fast-style modules call ``aten._weight_int4pack_mm_for_cpu`` (weight packed by
``aten._convert_weight_to_int4pack_for_cpu``) and ``aten._weight_int8pack_mm``; compiled
with backend="qcompile" each call becomes one qcompile op, and the numbers match a float64
reference computed from the dequantized weight. Near misses stay as they were, with the
reason in the report.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, rel_err
from test_backend import ATEN_MMS, QC_OPS, GraphSpy
from torch import nn

import qcompile
from qcompile.lowering import packed_ops, weight_only

aten = torch.ops.aten
DTYPES = [torch.bfloat16, torch.float16, torch.float32]  # what the CPU ops accept
DTYPE_IDS = ["bf16", "f16", "f32"]
PACKED = set(packed_ops.OPS)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-fast's asymmetric int4: q unsigned in [0, 15] int32 [N, K], and scales_and_zeros
    [K/g, N, 2] float32 with zeros = min + scale * 8 (so W = (q - 8) * s + z)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo).clamp(min=1e-6) / 15
    zero = lo + scale * 8
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), torch.stack([scale.t(), zero.t()], -1).contiguous()


def dequant_int4(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """W [N, K] in float64 from q [N, K] and scales_and_zeros [K/g, N, 2] (tinygemm's rule)."""
    s = sz[..., 0].double().t().repeat_interleave(group, 1)
    z = sz[..., 1].double().t().repeat_interleave(group, 1)
    return (q.double() - 8) * s + z


class WeightOnlyInt4Linear(nn.Module):
    """gpt-fast's int4 linear on CPU: packed weight and scales_and_zeros as buffers."""

    def __init__(self, k: int, n: int, group: int, dtype: torch.dtype, inner_k_tiles: int = 8):
        super().__init__()
        q, sz = quantize_int4(torch.randn(n, k), group)
        self.register_buffer("weight", aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles))
        self.register_buffer("scales_and_zeros", sz.to(dtype))
        self.group, self.n = group, n
        self.w64 = dequant_int4(q, self.scales_and_zeros, group)  # the float64 reference weight

    def forward(self, x):
        shape = x.shape
        y = aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), self.weight, self.group,
                                             self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.n)


class WeightOnlyInt8Linear(nn.Module):
    """gpt-fast's int8 linear as ``_weight_int8pack_mm``: int8 [N, K] and scales [N]."""

    def __init__(self, k: int, n: int, dtype: torch.dtype):
        super().__init__()
        w = torch.randn(n, k)
        s = w.abs().amax(1) / 127
        self.register_buffer("weight", (w / s[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", s.to(dtype))
        self.n = n
        self.w64 = self.weight.double() * self.scales.double()[:, None]

    def forward(self, x):
        shape = x.shape
        y = aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
        return y.reshape(*shape[:-1], self.n)


def make(kind: str, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "int4":
        layers = [WeightOnlyInt4Linear(256, 128, 64, dtype), WeightOnlyInt4Linear(128, 64, 32, dtype)]
    else:
        layers = [WeightOnlyInt8Linear(256, 128, dtype), WeightOnlyInt8Linear(128, 64, dtype)]
    return nn.Sequential(layers[0], nn.ReLU(), layers[1])


def reference(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The model in float64 on the dequantized weights."""
    h = torch.relu(x.double() @ model[0].w64.t())
    return h @ model[2].w64.t()


OP_NAMES = {"int4": "_weight_int4pack_mm_for_cpu", "int8": "_weight_int8pack_mm"}
FORMATS = {"int4": ["w4a16 int4 g64+offsets (tinygemm)", "w4a16 int4 g32+offsets (tinygemm)"],
           "int8": ["w8a16 int8 per-channel (int8pack)"] * 2}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_packed_ops_are_taken_over(kind, dtype, dynamic):
    model = make(kind, dtype)
    spy = GraphSpy()
    compiled = torch.compile(model, backend="qcompile", dynamic=dynamic)
    # Dynamo specializes sizes 0 and 1, so the dynamic M values avoid them.
    shapes = [(2, 5, 256), (3, 7, 256), (4, 3, 256)] if dynamic else [(2, 5, 256)]
    with torch.no_grad(), qcompile.collect() as report, spy.installed():
        for shape in shapes:
            x = torch.randn(*shape, dtype=dtype)
            out = compiled(x)
            assert out.shape == (*shape[:-1], 64) and out.dtype == dtype
            assert rel_err(out, reference(model, x)) <= TOL[dtype], f"shape {shape}"
            assert rel_err(out, model(x)) <= TOL[dtype], f"shape {shape} (eager)"
    assert [r.matched for r in report.records] == [True, True], str(report)
    assert [r.format for r in report.records] == FORMATS[kind]
    assert [r.op for r in report.records] == [OP_NAMES[kind]] * 2
    assert len(spy.graphs) == 1  # one compile for every M
    targets, consts = spy.graphs[0]
    assert sum(t in QC_OPS for t in targets) == 2
    assert not any(t in PACKED or t in ATEN_MMS for t in targets), targets
    if kind == "int8":  # the model's own int8 [N, K] tensors serve the op: no second copy
        assert not [k for k in consts if k.startswith("_qcompile_qweight")]


def test_int4_read_through_the_op_in_chunks(monkeypatch):
    """The identity probe reads q - 8 exactly, also when it runs in several chunks of rows."""
    torch.manual_seed(0)
    n, k, g = 64, 512, 128
    q, sz = quantize_int4(torch.randn(n, k), g)
    packed = aten._convert_weight_to_int4pack_for_cpu(q, 8)
    op = aten._weight_int4pack_mm_for_cpu.default
    whole = packed_ops._read_int4(op, packed, g, n, k, torch.bfloat16)
    monkeypatch.setattr(packed_ops, "PROBE_BYTES", 100 * (k + n) * 2)  # 100 rows a call
    chunked = packed_ops._read_int4(op, packed, g, n, k, torch.bfloat16)
    assert torch.equal(whole, q.to(torch.int16) - 8)
    assert torch.equal(chunked, whole)


class PackedWeightInput(nn.Module):
    """The packed weight is an input of the compiled function, not a parameter or buffer."""

    def forward(self, x, w, sz):
        return aten._weight_int4pack_mm_for_cpu(x, w, 64, sz)


class Int8WeightInput(nn.Module):
    def forward(self, x, w, s):
        return aten._weight_int8pack_mm(x, w, s)


def test_non_constant_weights_are_left_alone():
    torch.manual_seed(0)
    q, sz = quantize_int4(torch.randn(64, 256), 64)
    w4, sz = aten._convert_weight_to_int4pack_for_cpu(q, 8), sz.to(torch.bfloat16)
    w8, s8 = torch.randint(-128, 128, (64, 256), dtype=torch.int8), torch.rand(64) / 100
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    cases = [(PackedWeightInput(), (x, w4, sz), "packed int4 weight is not constant"),
             (Int8WeightInput(), (x, w8, s8.to(x.dtype)), "int8 weight is not constant")]
    for model, args, reason in cases:
        torch._dynamo.reset()
        with torch.no_grad(), qcompile.collect() as report:
            out = torch.compile(model, backend="qcompile")(*args)
        assert [r.matched for r in report.records] == [False], str(report)
        assert reason in report.records[0].reason
        assert rel_err(out, model(*args)) <= TOL[x.dtype]


def test_group_size_the_kernels_do_not_take_is_left_alone(monkeypatch):
    """The CPU op itself takes only 32/64/128/256, the kernels' sizes: narrow the kernels'
    list to see the op's group size checked against it."""
    monkeypatch.setattr(weight_only, "KERNEL_GROUP_SIZES", (256, 128, 64))
    model = make("int4", torch.bfloat16)  # layers of group 64 and 32
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert [r.matched for r in report.records] == [True, False], str(report)
    assert "group size 32 not supported" in report.records[1].reason
    assert rel_err(out, reference(model, x)) <= TOL[x.dtype]


def test_a_misread_weight_is_caught_at_compile_time(monkeypatch):
    """Should the identity probe misread the tiling, the check against the op's own output
    refuses the match: never a silently wrong result."""
    real = packed_ops._read_int4
    monkeypatch.setattr(packed_ops, "_read_int4", lambda *a: real(*a).roll(1, dims=1))
    model = make("int4", torch.bfloat16)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert [r.matched for r in report.records] == [False, False], str(report)
    assert all("does not reproduce its output" in r.reason for r in report.records)
    assert rel_err(out, reference(model, x)) <= TOL[x.dtype]


class Attention3(nn.Module):
    """q/k/v as three tinygemm linears reading one activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (WeightOnlyInt4Linear(256, 128, 128, torch.bfloat16)
                                  for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def test_tinygemm_linears_on_one_activation_share_a_launch():
    model = Attention3()
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert [r.matched for r in report.records] == [True] * 3, str(report)
    assert all("one launch with" in r.kernel for r in report.records), str(report)
    xd = x.double()
    ref = (xd @ model.q.w64.t()) * (xd @ model.k.w64.t()) + xd @ model.v.w64.t()
    assert rel_err(out, ref) <= TOL[x.dtype]
