"""Every example runs (on the CPU, with the reference kernels) and exits cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,args", [
    ("demo.py", []),  # the README's quick start: every format, one process
    ("read_report.py", []),
    ("torchao_model.py", []),
    ("export_and_load.py", []),
    ("decode_llama.py", ["--new", "6"]),
    ("tp_decode.py", ["--cpu", "--new", "4"]),  # two gloo ranks, started by the example itself
])
def test_example_runs(script, args, tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.strip()
