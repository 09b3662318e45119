"""Models quantized by other libraries (torchao, HQQ) compile to qcompile ops.

Each library is imported only if installed (the test extra installs both on CPU);
otherwise its tests are skipped with the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TOL, rel_err
from torch import nn

import qcompile

DTYPES = [torch.float32, torch.bfloat16]


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).to(dtype)


def _check(model, dtype, expected_format, m=20):
    x = torch.randn(m, 256, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        report = qcompile.explain(model, x)
        torch._dynamo.reset()
        out = torch.compile(model, backend="qcompile")(x)
    assert [r.matched for r in report.records] == [True, True], str(report)
    assert {r.format.replace(" +bias", "") for r in report.records} == {expected_format}
    assert rel_err(out, ref) <= TOL[dtype]


def _torchao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("torchao.quantization", reason="torchao is not installed")


@pytest.mark.parametrize("dtype", DTYPES)
def test_torchao_int8_weight_only(dtype):
    tq = _torchao()
    model = _mlp(dtype)
    tq.quantize_(model, tq.Int8WeightOnlyConfig())
    _check(model, dtype, "w8a16 int8 per-channel post-scale")


@pytest.mark.parametrize("dtype", DTYPES)
def test_torchao_int8_dynamic_activation_int8_weight(dtype):
    tq = _torchao()
    model = _mlp(dtype)
    tq.quantize_(model, tq.Int8DynamicActivationInt8WeightConfig())
    _check(model, dtype, "w8a8 int8 per-token x per-channel")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64])
def test_torchao_intx_int4_weight_only(dtype, group):
    tq = _torchao()
    from torchao.quantization.granularity import PerGroup
    model = _mlp(dtype)
    tq.quantize_(model, tq.IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                granularity=PerGroup(group)))
    _check(model, dtype, f"w4a16 int4 g{group}")


def test_torchao_int4_weight_only_needs_gpu_kernels():
    tq = _torchao()
    model = _mlp(torch.bfloat16)
    try:
        tq.quantize_(model, tq.Int4WeightOnlyConfig(group_size=64))
    except Exception as e:  # its CPU path needs optional native packages
        pytest.skip(f"torchao Int4WeightOnlyConfig does not run here: {e}")
    _check(model, torch.bfloat16, "w4a16 uint4 g64+zeros")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", [4, 8])
def test_hqq_pytorch_backend(dtype, nbits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hq = pytest.importorskip("hqq.core.quantize", reason="hqq is not installed")
    model = _mlp(dtype)
    hq.HQQLinear.set_backend(hq.HQQBackend.PYTORCH)
    cfg = hq.BaseQuantizeConfig(nbits=nbits, group_size=64)
    for i in (0, 2):
        model[i] = hq.HQQLinear(model[i], quant_config=cfg, compute_dtype=dtype, device="cpu")
    kind = "uint4" if nbits == 4 else "uint8"
    _check(model, dtype, f"w{nbits}a16 {kind} g64+float-zeros")
