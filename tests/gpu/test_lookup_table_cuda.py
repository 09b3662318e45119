"""Lookup-table (NF4, FP4, codebook) weights on CUDA: the kernels against a float64 reference
(the decode kernel up to 64 tokens, dequantize + cuBLAS beyond), and a quantized model taken
over by the backend with eager's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile
from qcompile.kernels import lut_gemm, ops
from qcompile.lowering import lookup_table

pytestmark = pytest.mark.gpu

# The decode kernel rounds the table to the activation type (NF4's values are not bf16
# values) and sums in fp32: errors of a bf16 weight, relative to the float64 product.
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _problem(n, k, block, table_name, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    table = (lookup_table.code_table(table_name) if table_name != "random"
             else torch.randn(16, generator=g))
    scales = torch.rand(n, k // block, generator=g) * 0.02 + 0.01
    w64 = table.double()[codes.long()] * scales.double().repeat_interleave(block, 1)
    return codes, table, scales, w64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 32, 33, 64, 300])
def test_lut_kernels_against_float64(dtype, block, m):
    n, k = 512, 1024
    codes, table, scales, w64 = _problem(n, k, block, "nf4", dtype, seed=m)
    qweight, table_k, scales_k = (t.cuda() for t in lut_gemm.prepare(codes, table, scales))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = torch.ops.qcompile.lut_gemm(x, qweight, table_k, scales_k, bias, block, "float32",
                                      lut_gemm.LAYOUT, "")
    ref = x.double() @ w64.cuda().t() + bias.double()
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel(out, ref) <= TOL[dtype], (m, _rel(out, ref))
    if m > lut_gemm.DECODE_MAX_M:
        # dequantize + cuBLAS: the reference's weight bit for bit, the same GEMM
        w = ops.lut_dequantize(ops.pack_nk(codes, 4).cuda(), table.cuda(), scales.cuda(), block,
                               "float32").to(dtype)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias), rtol=0, atol=0)
        # and the decode kernel forced past its range (CTAs of 32 tokens over the tokens)
        dec = lut_gemm.run(x, qweight, table_k, scales_k, bias, block, "float32", path="decode")
        assert _rel(dec, ref) <= TOL[dtype], (m, _rel(dec, ref))


@pytest.mark.parametrize("pair_table", [False, True])
@pytest.mark.parametrize("table_name", ["fp4", "random"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 14336), (48, 128)])
def test_lut_decode_kernel_tables_and_shapes(table_name, shape, pair_table, monkeypatch):
    monkeypatch.setattr(lut_gemm, "PAIR_TABLE", pair_table)  # both lookups of the kernel
    n, k = shape
    dtype = torch.bfloat16
    codes, table, scales, w64 = _problem(n, k, 64 if k % 128 else 128, table_name, dtype)
    block = 64 if k % 128 else 128
    qweight, table_k, scales_k = (t.cuda() for t in lut_gemm.prepare(codes, table, scales))
    for m in (1, 5, 20):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = torch.ops.qcompile.lut_gemm(x, qweight, table_k, scales_k, None, block,
                                          "bfloat16", lut_gemm.LAYOUT, "")
        assert _rel(out, x.double() @ w64.cuda().t()) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_model_is_taken_over_on_cuda(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512, bias=True), nn.SiLU(),
                          nn.Linear(512, 256, bias=False)).to("cuda", dtype)
    model = qcompile.quantize(model, "nf4", block_size=64)
    for m in (1, 4, 80):
        x = torch.randn(m, 256, device="cuda", dtype=dtype)
        report = qcompile.explain(model, x)
        assert len(report.matched) == 2, str(report)
        assert all("lookup-table decode kernel" in r.kernel for r in report.matched)
        with torch.no_grad():
            out = torch.compile(model, backend="qcompile")(x)
            ref = model(x)
        assert _rel(out, ref) <= TOL[dtype]
