"""Compile a model quantized by torchao with the qcompile backend.

    python examples/torchao_model.py

Needs torchao (``pip install torchao``); prints why it stops if it is missing.
"""

import sys
import warnings

import torch
from torch import nn

import qcompile

warnings.filterwarnings("ignore")  # torchao warns about optional native kernels
try:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
except ImportError:
    print("torchao is not installed: pip install torchao")
    sys.exit(0)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, 256)).to(torch.bfloat16)
quantize_(model, Int8DynamicActivationInt8WeightConfig())
x = torch.randn(32, 512, dtype=torch.bfloat16)

with torch.no_grad(), qcompile.collect() as report:
    expected = model(x)
    got = torch.compile(model, backend="qcompile")(x)
print(report)
err = float((got.double() - expected.double()).norm() / expected.double().norm())
print(f"relative error vs eager: {err:.2e}")
assert len(report.matched) == 2 and err < 2e-2
