"""Export / load on CUDA: the loaded artifact runs the qcompile CUDA kernels (the decode
kernels for a token, CUTLASS for many) and matches the model it was exported from.

Export needs a C++ compiler that links libstdc++ dynamically: where $CXX links it statically
(the H100 image's /opt/gcc/bin/g++), export raises ExportError; run with CXX=/usr/bin/g++."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import qcompile
from qcompile.export import read_metadata

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels one call of fn launches."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8"])
def test_round_trip_runs_the_cuda_kernels(method, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    model = qcompile.quantize(model.to("cuda", torch.bfloat16), method, group_size=128)
    path = tmp_path / f"{method}.pt2"
    m = torch.export.Dim("m", min=1, max=1024)
    x8 = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    qcompile.export(model, (x8,), path, dynamic_shapes=({0: m},))
    records = read_metadata(path)["report"]
    assert [r["matched"] for r in records] == [True, True], records

    loaded = qcompile.load(path)
    for tokens, kernel in ((1, "decode_kernel"), (7, "decode_kernel"), (300, "GemmUniversal")):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = model(x)
            out = loaded(x)
            names = _cuda_kernels(lambda: loaded(x))  # noqa: B023
        assert out.shape == ref.shape and out.dtype == torch.bfloat16
        assert _rel(out, ref) <= 1e-2, (tokens, _rel(out, ref))
        assert any(kernel in n for n in names), (tokens, names)
