"""qcompile: run quantized LLM linears as fused kernels from plain PyTorch.

``torch.compile(model, backend="qcompile")`` finds the quantized linear layers in the
captured graph (dequant + matmul, int8 matmul + rescale) and runs each as one qcompile op,
a CUTLASS kernel on NVIDIA GPUs and a reference implementation elsewhere.

Public API:
- ``quantize(model, method, ...)``: replace a model's ``nn.Linear`` layers by reference
  quantized modules (formats W8A16, W4A16, W8A8, NF4 / FP4).
- ``explain(model, *inputs, ...)``: compile and run once, return the match ``Report``.
- ``last_report()``, ``collect()``: the reports of compiles you ran yourself.
- ``backend``: the backend callable (also registered by name as "qcompile").
- ``export(model, example_inputs, path, package="program" | "aoti")`` / ``load(path)``: one ``.pt2`` file
  with the rewritten graph and the repacked weights.
- ``tp.shard(model, rank, world_size, plan)``: tensor parallelism, linears (quantized or
  not) split column- or row-wise over ``torch.distributed`` ranks (module ``qcompile.tp``).
"""

from __future__ import annotations

import torch

from . import _compat, tp
from .backend import collect, last_report, qcompile_backend, register
from .export import ArtifactError, ExportError, export, load
from .formats import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    LookupTable4bitLinear,
    SmoothQuantLinear,
    quantize,
)
from .lowering.report import MatchRecord, Report

__version__ = "0.1.0"
backend = qcompile_backend

__all__ = [
    "quantize", "explain", "last_report", "collect", "backend", "Report", "MatchRecord",
    "Int8WeightOnlyLinear", "Int4WeightOnlyLinear", "SmoothQuantLinear",
    "LookupTable4bitLinear", "__version__",
    "export", "load", "ArtifactError", "ExportError", "tp",
]


def explain(model: torch.nn.Module, *inputs, dynamic: bool | None = None,
            mode: str | None = None, options: dict | None = None) -> Report:
    """Compile ``model`` with the qcompile backend, run it once on ``inputs`` under
    ``torch.no_grad()``, and return the match report (prints as a table).

    Resets torch.compile's caches first (``torch._dynamo.reset()``), so that the model is
    really compiled again and every graph is reported.
    """
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qcompile_backend, dynamic=dynamic, mode=mode,
                             options=options)
    with collect() as report, torch.no_grad():
        compiled(*inputs)
    return report


_compat.register_torch_log("qcompile")
register()
