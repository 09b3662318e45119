"""The reference quantized modules against float, their packings, and quantize()'s checks."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch import nn

import qcompile
from qcompile.formats import (
    AWQ_ORDER,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    SmoothQuantLinear,
    quantize_groupwise_int4,
)
from qcompile.kernels.ops import pack_nk, unpack_nk

torch.manual_seed(0)


def _linear(dtype, bias=True):
    return nn.Linear(256, 64, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ["pre", "post"])
def test_int8_weight_only_close_to_float(dtype, style):
    lin = _linear(dtype)
    x = torch.randn(5, 256, dtype=dtype)
    assert rel_err(Int8WeightOnlyLinear.from_linear(lin, style)(x), lin(x)) < 1e-2


@pytest.mark.parametrize("packing", ["uint8", "awq", "gptq"])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_packings_agree_and_are_close_to_float(packing, zero_point, group):
    lin = _linear(torch.float32)
    x = torch.randn(5, 256)
    q, s, z = quantize_groupwise_int4(lin.weight, group, zero_point)
    w = ((q - (z.repeat_interleave(group, 1) if z is not None else 0))
         * s.repeat_interleave(group, 1))
    expected = nn.functional.linear(x, w, lin.bias)
    mod = Int4WeightOnlyLinear.from_linear(lin, group, zero_point, packing)
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)
    assert rel_err(mod(x), lin(x)) < 0.1  # 4-bit error on random weights is ~6%


def test_awq_packing_interleaves_channels():
    q = torch.arange(8, dtype=torch.int16).repeat(8, 1).t().contiguous()  # N=8: row n = n
    q = q[:, :8].contiguous()
    s = torch.ones(8, 1)
    mod = Int4WeightOnlyLinear(q, s, torch.zeros(8, 1), group_size=8, packing="awq")
    word = int(mod.qweight[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == list(AWQ_ORDER)


@pytest.mark.parametrize("bits,signed", [(4, True), (4, False), (8, True), (8, False)])
def test_pack_unpack_roundtrip(bits, signed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2 ** bits)
    q = torch.randint(lo, hi, (6, 32), dtype=torch.int16)
    packed = pack_nk(q, bits)
    assert packed.dtype in (torch.int8, torch.uint8)
    assert packed.shape == ((6, 16) if bits == 4 else (6, 32))
    assert torch.equal(unpack_nk(packed, bits, signed), q)


@pytest.mark.parametrize("act", ["dynamic", "static", "dynamic_asym"])
def test_smoothquant_close_to_float(act):
    lin = _linear(torch.float32)
    x = torch.randn(3, 7, 256)
    smooth = torch.rand(256) + 0.5
    mod = SmoothQuantLinear.from_linear(lin, act=act, smooth=smooth,
                                        act_absmax=float((x / smooth).abs().max()))
    assert mod(x).shape == (3, 7, 64)
    assert rel_err(mod(x), lin(x)) < 3e-2


def test_asymmetric_activations_use_all_levels_on_one_sided_rows():
    """act="dynamic_asym" on non-negative inputs (after a ReLU/GELU): a zero point spends
    all 256 levels on [0, max], so it is closer to float than the symmetric scheme, which
    leaves the negative half unused."""
    lin = _linear(torch.float32)
    with torch.no_grad():  # a weight int8 per channel represents exactly: activation error only
        q = torch.randint(-127, 128, lin.weight.shape).float()
        q[:, 0] = 127
        lin.weight.copy_(q * 0.01)
    x = torch.rand(4, 256) * 3
    sym = SmoothQuantLinear.from_linear(lin, act="dynamic")
    asym = SmoothQuantLinear.from_linear(lin, act="dynamic_asym")
    assert torch.equal(asym.azp_adj, asym.qweight.sum(dim=1, dtype=torch.int32))
    assert rel_err(asym(x), lin(x)) < 0.7 * rel_err(sym(x), lin(x))


def test_quantize_replaces_linears_in_place_and_skips():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    out = qcompile.quantize(m, "w4a16", group_size=32, skip=["2"])
    assert out is m
    assert isinstance(m[0], Int4WeightOnlyLinear) and type(m[2]) is nn.Linear


def test_quantize_static_calibrates():
    m = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    qcompile.quantize(m, "w8a8", act="static", calibration=[x])
    assert float(m[0].act_scale) == pytest.approx(float(x.abs().max()) / 127)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="w3a16"), "method must be one of"),
    (dict(method="w4a16", group_size=96), "group_size must be one of"),
    (dict(method="w4a16", packing="marlin"), "packing must be one of"),
    (dict(method="w8a16", style="mid"), "style must be"),
    (dict(method="w8a8", act="static"), "act='static' needs calibration"),
    (dict(method="w8a8", act="asym"), "act must be one of"),
])
def test_quantize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qcompile.quantize(nn.Linear(64, 64), **kwargs)


def test_quantize_rejects_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        qcompile.quantize("model", "w8a16")


def test_module_constructors_check_inputs():
    with pytest.raises(TypeError, match="qweight must be a 2-D int8"):
        Int8WeightOnlyLinear(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="does not divide"):
        Int4WeightOnlyLinear(torch.zeros(8, 48, dtype=torch.int16), torch.ones(8, 1),
                             None, group_size=32)
    with pytest.raises(ValueError, match="needs a positive act_scale"):
        SmoothQuantLinear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4), act="static")
