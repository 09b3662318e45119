"""Read the match report: which linears qcompile took over, and why it left the others.

    python examples/read_report.py

Also try ``TORCH_LOGS="qcompile" python examples/read_report.py`` (one log line per
decision) or ``TORCH_LOGS="+qcompile" QCOMPILE_DEBUG_DIR=graphs ...`` (graphs as files).
"""

import torch
from torch import nn

import qcompile

torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(256, 256),   # quantized below
    nn.ReLU(),
    nn.Linear(256, 128),   # quantized below, W8A8
    nn.ReLU(),
    nn.Linear(128, 64),    # left in float: reported as not quantized
)
model[0] = qcompile.Int4WeightOnlyLinear.from_linear(model[0], group_size=128)
model[2] = qcompile.SmoothQuantLinear.from_linear(model[2])
x = torch.randn(8, 256)

report = qcompile.explain(model, x)
print(report)                                   # a table
for record in report.records:                   # or data
    if record.matched:
        print(f"{record.source}: {record.format} on {record.kernel}")
    else:
        print(f"{record.source}: left to Inductor because {record.reason}")
assert len(report.matched) == 2 and len(report.unmatched) == 1
