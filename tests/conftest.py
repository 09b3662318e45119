"""Shared test setup: GPU marker handling and a clean torch.compile state per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The benchmarks' models (llama_model, decode_attention, gptfast_model) are not part of the
# package; tests import them from benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return float((out - ref).norm() / ref.norm())


TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}
