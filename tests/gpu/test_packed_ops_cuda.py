"""tinygemm's ``aten._weight_int4pack_mm`` (weight from ``aten._convert_weight_to_int4pack``,
inner_k_tiles 8, bf16: gpt-fast's int4 on CUDA) and ``aten._weight_int8pack_mm`` on CUDA,
compiled with backend="qcompile": each call becomes one qcompile op on a CUTLASS kernel,
and the numbers match a float64 reference from the dequantized weight and eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile

pytestmark = pytest.mark.gpu
aten = torch.ops.aten
PACKED = (aten._weight_int4pack_mm.default, aten._weight_int8pack_mm.default)
QC_OPS = (torch.ops.qcompile.mixed_gemm.default, torch.ops.qcompile.mixed_gemm_gated.default,
          torch.ops.qcompile.mixed_gemm_norm_out.default)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _int4pack(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """``_convert_weight_to_int4pack`` of q (int32 [N, K] in [0, 15], on CUDA): recent torch
    takes uint8 [N, K/2] with element 2j in the high nibble of byte j (as torch's own tests
    and torchao pack it); torch before 2.5 took the int32 values."""
    q_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    try:
        return aten._convert_weight_to_int4pack(q_u8, inner_k_tiles)
    except RuntimeError:
        return aten._convert_weight_to_int4pack(q, inner_k_tiles)


class Int4Linear(nn.Module):
    """gpt-fast's WeightOnlyInt4Linear: zeros = min + scale * 8, W = (q - 8) * s + z."""

    def __init__(self, k: int, n: int, group: int):
        super().__init__()
        w = torch.randn(n, k, device="cuda")
        wg = w.reshape(n, k // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = (hi - lo).clamp(min=1e-6) / 15
        zero = lo + scale * 8
        q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        q = q.reshape(n, k)
        sz = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
        self.register_buffer("weight", _int4pack(q, 8))
        self.register_buffer("scales_and_zeros", sz)
        self.group, self.n = group, n
        s = sz[..., 0].double().t().repeat_interleave(group, 1)
        z = sz[..., 1].double().t().repeat_interleave(group, 1)
        self.w64 = (q.double() - 8) * s + z

    def forward(self, x):
        shape = x.shape
        y = aten._weight_int4pack_mm(x.reshape(-1, shape[-1]), self.weight, self.group,
                                     self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.n)


class Int8Linear(nn.Module):
    """gpt-fast's int8 weight-only linear as ``_weight_int8pack_mm``."""

    def __init__(self, k: int, n: int):
        super().__init__()
        w = torch.randn(n, k, device="cuda")
        s = w.abs().amax(1) / 127
        self.register_buffer("weight", (w / s[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", s.to(torch.bfloat16))
        self.n = n
        self.w64 = self.weight.double() * self.scales.double()[:, None]

    def forward(self, x):
        shape = x.shape
        y = aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
        return y.reshape(*shape[:-1], self.n)


def _model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "int4":
        return nn.Sequential(Int4Linear(1024, 512, 128), nn.ReLU(), Int4Linear(512, 256, 64))
    return nn.Sequential(Int8Linear(1024, 512), nn.ReLU(), Int8Linear(512, 256))


FORMATS = {"int4": ["w4a16 int4 g128+offsets (tinygemm)", "w4a16 int4 g64+offsets (tinygemm)"],
           "int8": ["w8a16 int8 per-channel (int8pack)"] * 2}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_packed_ops_on_cuda(kind, dynamic):
    model = _model(kind)
    graphs = []

    def spy(graph):
        graphs.append([n.target for n in graph.nodes if n.op == "call_function"])

    tokens = [2, 16, 80] if dynamic else [16]
    xs = [torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16) for m in tokens]
    with torch.no_grad():
        try:
            eager = [model(x) for x in xs]
        except NotImplementedError as e:  # an op without a CUDA kernel in this torch
            pytest.skip(f"{kind} op not available on CUDA here: {e}")
        compiled = torch.compile(model, backend="qcompile", dynamic=dynamic)
        with qcompile.collect() as report, \
                torch._inductor.config.patch(post_grad_custom_post_pass=spy):
            outs = [compiled(x) for x in xs]
    for x, out, ref_eager in zip(xs, outs, eager):
        ref = torch.relu(x.double() @ model[0].w64.t()) @ model[2].w64.t()
        assert _rel(ref_eager, ref) <= 2e-2, "the test's packing does not match the op's"
        assert _rel(out, ref) <= 2e-2, f"M={x.shape[0]}"
        assert _rel(out, ref_eager) <= 2e-2, f"M={x.shape[0]}"
    print(report)
    assert [r.matched for r in report.records] == [True, True] * len(graphs), str(report)
    assert [r.format for r in report.records] == FORMATS[kind] * len(graphs)
    assert all(not r.kernel.startswith("reference") for r in report.records), str(report)
    if dynamic:
        assert len(graphs) == 1  # one compile for every M
    for targets in graphs:
        assert sum(t in QC_OPS for t in targets) == 2, targets
        assert not any(t in PACKED for t in targets), targets


def test_tinygemm_decode_layer_shape():
    """A 14336 x 4096 down projection at 16 tokens (the shape where tinygemm is slowest
    against qcompile): matched, on a CUTLASS kernel, and equal to tinygemm within bf16."""
    torch.manual_seed(0)
    layer = Int4Linear(14336, 4096, 128)
    x = torch.randn(16, 14336, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(layer, backend="qcompile")(x)
        ref_eager = layer(x)
    assert [r.matched for r in report.records] == [True], str(report)
    assert not report.records[0].kernel.startswith("reference"), str(report)
    assert _rel(out, x.double() @ layer.w64.t()) <= 2e-2
    assert _rel(out, ref_eager) <= 2e-2
