"""Export a quantized model to one .pt2 file, load it back and run it.

    python examples/export_and_load.py [path.pt2] [--package program|aoti]

The artifact holds the rewritten graph (qcompile ops) and the repacked weights; loading
needs qcompile and the same torch version, not the model's code. The default kind,
"program" (torch.export.save), loads on CPU and GPU and is compiled by Inductor on load;
"aoti" is compiled ahead of time by AOTInductor (CPU: its loader segfaults on the GPU
image's torch 2.11).
"""

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import qcompile

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("path", nargs="?", type=Path, default=None)
p.add_argument("--package", default="program", choices=["program", "aoti"])
args = p.parse_args()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
qcompile.quantize(model, "w4a16", group_size=64)
x = torch.randn(8, 256)

path = args.path or Path(tempfile.mkdtemp()) / "model.pt2"
tokens = torch.export.Dim("tokens", min=1, max=2048)
qcompile.export(model, (x,), path, dynamic_shapes=({0: tokens},), package=args.package)
print(f"wrote a {args.package!r} artifact to {path} ({path.stat().st_size / 1e6:.1f} MB)")
print(qcompile.last_report())

loaded = qcompile.load(path)  # a program is compiled by Inductor on its first call
for m in (1, 8, 100):
    xi = torch.randn(m, 256)
    with torch.no_grad():
        err = float((loaded(xi) - model(xi)).abs().max())
    print(f"M={m}: max abs difference vs the eager model {err:.2e}")
    assert err < 1e-4
