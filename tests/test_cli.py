"""The qcompile command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qcompile.cli", *args], cwd=HERE,
                          capture_output=True, text=True, timeout=300)


def test_explain_prints_the_report_table():
    res = _cli("explain", "cli_factory:build")
    assert res.returncode == 0, res.stderr
    assert "1 of 2 matmuls run as qcompile ops" in res.stdout
    assert "weight is a float constant (not quantized)" in res.stdout


def test_explain_json_is_data():
    res = _cli("explain", "cli_factory:build", "--json", "--no-freezing")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["matched"] for r in rows] == [True, False]
    assert rows[0]["format"] == "w8a16 int8 per-channel"


def test_explain_reports_bad_factories():
    assert "expected 'module:function'" in _cli("explain", "cli_factory").stderr
    assert "cannot load 'cli_factory:nope'" in _cli("explain", "cli_factory:nope").stderr
    assert "must return (model, inputs)" in _cli("explain", "cli_factory:not_a_pair").stderr


def test_build_reports_missing_kernels_without_compiling(tmp_path):
    env_cache = {"QCOMPILE_CACHE_DIR": str(tmp_path), "QCOMPILE_BUILD": "0"}
    res = subprocess.run([sys.executable, "-m", "qcompile.cli", "build", "--arch", "sm_80"],
                         cwd=HERE, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, **env_cache))
    assert res.returncode == 1
    assert "not in the cache" in res.stderr and "QCOMPILE_BUILD=0 forbids compiling" in res.stderr
