"""The export benchmark's CPU smoke mode: the decode step exported in one process, loaded
in another, same tokens, and the two rows written (on the GPU the same script is the
measurement; here it only has to keep working)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_export.py"


def test_bench_export_cpu_smoke(tmp_path):
    out = tmp_path / "export.jsonl"
    res = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--config", "tiny", "--prompt", "8",
         "--new", "4", "--reps", "1", "--formats", "w8a8", "--tolerance", "1",
         "--keep", str(tmp_path / "artifacts"), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    compiled, loaded = (json.loads(line) for line in out.read_text().splitlines())
    assert (compiled["impl"], loaded["impl"]) == ("qcompile", "qcompile-export-program")
    assert loaded["same_tokens"] is True and loaded["ratio_vs_compiled"] > 0
    assert compiled["matched"] != "0/15" and compiled["tokens_per_s"] > 0
    assert (tmp_path / "artifacts" / "tiny-w8a8-program.pt2").is_file()
    assert "same 4 tokens: True -> ok" in res.stdout
