"""Linears that read the previous linear's 2-D result directly (no view between them): each
is rewritten in the graph Inductor compiles, not only reported as matched."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_backend import GraphSpy, rel_err

import qcompile

MIXED = torch.ops.qcompile.mixed_gemm.default


@pytest.mark.parametrize("fuse_linears", [True, False])
def test_chained_2d_linears_all_run_as_qcompile_ops(fuse_linears):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64, bias=False), nn.Linear(64, 64, bias=False),
                          nn.Linear(64, 32)).to(torch.bfloat16)
    qcompile.quantize(model, "w4a16", group_size=64)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        torch._dynamo.reset()
        spy = GraphSpy()
        with spy.installed():
            out = torch.compile(model, backend="qcompile",
                                options={"fuse_linears": fuse_linears})(x)
        ref = model(x)
    targets = spy.graphs[0][0]
    assert len(qcompile.last_report().matched) == 3
    assert sum(t is MIXED for t in targets) == 3
    assert torch.ops.aten.mm.default not in targets and torch.ops.aten.addmm.default not in targets
    assert rel_err(out, ref) <= 2e-2
