"""The qcompile ops: reference numerics, fake implementations under symbolic shapes, opcheck."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import qcompile  # noqa: F401  (registers the ops)
from qcompile.kernels import ops
from qcompile.kernels.ops import dequantize, pack_nk

mixed_gemm = torch.ops.qcompile.mixed_gemm.default
int8_gemm = torch.ops.qcompile.int8_gemm.default


def _mixed_args(bits=4, signed=False, group=32, zero_mode="sub", n=16, k=64, dtype=torch.float32):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2 ** bits)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int16)
    scales = torch.rand(n, k // group, dtype=dtype) + 0.1
    zeros = None if zero_mode == "none" else torch.randint(0, 2 ** bits, (n, k // group)).to(dtype)
    return q, pack_nk(q, bits), scales, zeros


@pytest.mark.parametrize("bits,signed,zero_mode", [
    (4, False, "sub"), (4, True, "none"), (8, True, "none"), (8, False, "sub"), (4, False, "add")])
def test_mixed_gemm_reference_matches_dequant_matmul(bits, signed, zero_mode):
    q, qw, s, z = _mixed_args(bits, signed, 32, zero_mode)
    x = torch.randn(3, 5, 64)
    bias = torch.randn(16)
    out = mixed_gemm(x, qw, s, z, bias, bits, signed, 32, zero_mode, "float32", "nk")
    zz = 0 if z is None else z.repeat_interleave(32, 1)
    ss = s.repeat_interleave(32, 1)
    w = q * ss + zz if zero_mode == "add" else (q - zz) * ss
    torch.testing.assert_close(out, x @ w.t() + bias)


def test_mixed_gemm_reference_rejects_kernel_layouts():
    q, qw, s, z = _mixed_args()
    with pytest.raises(ValueError, match="reference mixed_gemm reads layout 'nk'"):
        mixed_gemm(torch.randn(2, 64), qw, s, z, None, 4, False, 32, "sub", "float32",
                   "sm90_mixed_v1")


def test_dequantize_rejects_unknown_zero_mode():
    q, qw, s, z = _mixed_args()
    with pytest.raises(ValueError, match="zero_mode must be one of"):
        dequantize(qw, s, z, 4, False, 32, "mul", torch.float32)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("per_token", [True, False])
def test_int8_gemm_reference_is_exact_int_then_float_rescale(m, per_token):
    xq = torch.randint(-128, 128, (m, 64), dtype=torch.int8)
    wq = torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    row = torch.rand(m if per_token else 1, 1) + 0.01
    col = torch.rand(1, 16) + 0.01
    bias = torch.randn(16)
    out = int8_gemm(xq, wq, row, col, bias, "bfloat16")
    acc = (xq.double() @ wq.double().t())
    ref = (acc * row.double() * col.double() + bias.double()).to(torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=8e-3, atol=1e-2)
    assert out.dtype == torch.bfloat16 and out.shape == (m, 16)


@pytest.mark.parametrize("m", [1, 5, 33])
def test_int8_gemm_reference_subtracts_zero_points_in_int32(m):
    """Asymmetric activations: (xq @ wq.T - azp * azp_adj) exactly, then the rescale; with
    azp_adj the column sums this is the product of the dequantized operands."""
    wq = torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    xq = torch.randint(-128, 128, (m, 64), dtype=torch.int8)
    azp = torch.randint(-128, 128, (m, 1), dtype=torch.int32)
    adj = wq.sum(dim=1, dtype=torch.int32)
    row, col = torch.rand(m, 1) + 0.01, torch.rand(1, 16) + 0.01
    out = int8_gemm(xq, wq, row, col, None, "float32", "", azp, adj)
    ref = ((xq.double() - azp.double()) @ wq.double().t()) * row.double() * col.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="azp and azp_adj come together"):
        int8_gemm(xq, wq, row, col, None, "float32", "", azp, None)


def test_fake_impls_follow_symbolic_shapes():
    q, qw, s, z = _mixed_args()

    def f(x, xq, qw, s, z, wq, row, col):
        a = mixed_gemm(x, qw, s, z, None, 4, False, 32, "sub", "float32", "nk")
        b = int8_gemm(xq, wq, row, col, None, "float16")
        return a, b

    gm = make_fx(f, tracing_mode="symbolic")(
        torch.randn(3, 7, 64), torch.zeros(5, 64, dtype=torch.int8), qw, s, z,
        torch.zeros(8, 64, dtype=torch.int8), torch.ones(5, 1), torch.ones(1, 8))
    outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    a, b = (o.meta["val"] for o in outs)
    assert len(a.shape) == 3 and str(a.shape[0]).startswith("s")
    assert str(a.shape[2]).startswith("s")  # N follows qweight's (symbolic) leading size
    assert str(b.shape[0]).startswith("s") and b.dtype == torch.float16


def test_opcheck_both_ops():
    q, qw, s, z = _mixed_args()
    torch.library.opcheck(mixed_gemm, (torch.randn(4, 64), qw, s, z, None, 4, False, 32, "sub",
                                       "float32", "nk"))
    torch.library.opcheck(int8_gemm, (torch.randint(-5, 5, (4, 64), dtype=torch.int8),
                                      torch.randint(-5, 5, (8, 64), dtype=torch.int8),
                                      torch.rand(4, 1), torch.rand(1, 8), None, "float32"))


def test_ops_name_their_dtypes():
    # dtype arguments are names (AOTInductor in torch 2.11 misreads ScalarType arguments)
    assert "str dequant_dtype" in str(mixed_gemm._schema)
    assert "str out_dtype" in str(int8_gemm._schema)
    assert [ops.as_dtype(ops.dtype_name(d)) for d in ops.OP_DTYPES] == list(ops.OP_DTYPES)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ops.as_dtype("float64")
    with pytest.raises(ValueError, match="qcompile ops compute in"):
        ops.dtype_name(torch.float64)
