"""The decode benchmark's CPU smoke mode runs and writes the rows the notes read (on the GPU
the same script is the measurement; here it only has to keep working)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_decode_cpu_smoke(tmp_path):
    out = tmp_path / "decode.jsonl"
    res = subprocess.run(
        [sys.executable, str(BENCH / "bench_decode.py"), "--device", "cpu", "--config", "tiny",
         "--prompt", "8", "--new", "3", "--models", "qcompile.llama", "--batch", "1",
         "--formats", "bf16,w4a16", "--impls", "inductor,qcompile", "--decode-max-m", "0,8",
         "--fuse-linears", "0,1", "--profile", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cells = [(r["format"], r["impl"], r.get("decode_max_m"), r.get("fuse_linears"))
             for r in rows]
    # bf16 has nothing to rewrite (no qcompile cell); each (--decode-max-m, --fuse-linears)
    # pair is one qcompile cell, the Inductor cells run once
    assert cells == [("bf16", "inductor", None, None), ("w4a16", "inductor", None, None),
                     ("w4a16", "qcompile", 0, False), ("w4a16", "qcompile", 0, True),
                     ("w4a16", "qcompile", 8, False), ("w4a16", "qcompile", 8, True)], cells
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["batch"] == 1
        assert {"baseline_gb", "weight_gb", "kv_cache_gb", "commit", "device"} <= r.keys()
    assert rows[2]["matched"] == rows[4]["matched"] != "0/0"
    # fusing q/k/v and gate/up leaves fewer qcompile ops for the same linears
    assert int(rows[3]["ops"]) < int(rows[2]["ops"]), (rows[2], rows[3])
    assert "Self CPU time total" in res.stdout  # --profile printed its table


def test_bench_decode_sweeps_a_library_setting(tmp_path):
    """--set MODULE.NAME=V1,V2: one qcompile cell per value, the value in the row's "set";
    a name the module does not have stops the run before any cell."""
    out = tmp_path / "decode.jsonl"
    cmd = [sys.executable, str(BENCH / "bench_decode.py"), "--device", "cpu", "--config", "tiny",
           "--prompt", "8", "--new", "3", "--models", "qcompile.llama", "--batch", "1",
           "--formats", "w8a16", "--impls", "inductor,qcompile", "--out", str(out)]
    res = subprocess.run(cmd + ["--set", "qcompile.kernels.mixed_gemm_decode.MAX_TOKENS=32,16"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["impl"], r.get("set")) for r in rows] == [
        ("inductor", None),
        ("qcompile", "qcompile.kernels.mixed_gemm_decode.MAX_TOKENS=32"),
        ("qcompile", "qcompile.kernels.mixed_gemm_decode.MAX_TOKENS=16")], rows
    bad = subprocess.run(cmd + ["--set", "qcompile.kernels.mixed_gemm_decode.MAX_TOKEN=1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "has no attribute 'MAX_TOKEN'" in bad.stderr
    short = subprocess.run(cmd[:9] + ["2"] + cmd[10:], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert short.returncode == 2 and "--new must be at least 3" in short.stderr
