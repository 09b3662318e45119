"""Lookup-table (NF4) weights on CUDA: recognised, but left to Inductor with the reason
until ``qcompile::lut_gemm`` has a GPU kernel (its reference would dequantize the whole
weight on every call); the compiled model still gives eager's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile

pytestmark = pytest.mark.gpu


def test_nf4_on_cuda_is_left_to_inductor_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.SiLU(),
                          nn.Linear(512, 256, bias=False)).to("cuda", torch.bfloat16)
    model = qcompile.quantize(model, "nf4", block_size=64)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    report = qcompile.explain(model, x)
    assert len(report) == 2 and not report.matched, str(report)
    assert all("no GPU kernel for lookup-table weights yet" in r.reason
               and "nf4" in r.reason for r in report.records), str(report)
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile")(x)
        ref = model(x)
    assert float((out.double() - ref.double()).norm() / ref.double().norm()) < 1e-2
