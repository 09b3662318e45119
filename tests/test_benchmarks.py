"""The decode benchmark's CPU smoke mode runs and writes the rows the notes read (on the GPU
the same script is the measurement; here it only has to keep working)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# --- bench_common's L2 flush, bench_w4a16 / bench_w8a8 arguments and rows (CPU) -------------

import importlib  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


class _FakeDriver:
    """triton 3.x's driver as do_bench uses it: a 256 MB buffer, cleared by zero-filling."""

    def get_empty_cache_for_benchmark(self):
        return torch.ones(256 * 2**20 // 4, dtype=torch.int32)

    def clear_cache(self, cache):
        cache.zero_()


@pytest.fixture
def fake_triton(monkeypatch):
    """A triton whose do_bench calls the driver the way triton 3.x's does: ``cache =
    driver.active.get_empty_cache_for_benchmark()``, then ``driver.active.clear_cache(cache)``
    before every call (looked up each time); it returns 0.5 ms and keeps the buffers."""
    triton = types.ModuleType("triton")
    runtime = types.ModuleType("triton.runtime")
    testing = types.ModuleType("triton.testing")
    runtime.driver = types.SimpleNamespace(active=_FakeDriver())
    caches = []

    def do_bench(fn, warmup=25, rep=100, return_mode="mean"):
        cache = runtime.driver.active.get_empty_cache_for_benchmark()
        caches.append(cache)
        for _ in range(3):
            runtime.driver.active.clear_cache(cache)
            fn()
        return 0.5

    testing.do_bench = do_bench
    triton.runtime, triton.testing, triton.__version__ = runtime, testing, "3.6.0-fake"
    triton.caches = caches
    for name, mod in (("triton", triton), ("triton.runtime", runtime),
                      ("triton.testing", testing)):
        monkeypatch.setitem(sys.modules, name, mod)
    return triton


def test_clean_flush_reads_the_buffer_and_restores_clear_cache(fake_triton):
    import bench_common as bc

    driver = fake_triton.runtime.driver.active
    original = driver.clear_cache
    calls = []
    assert bc.bench_us(lambda: calls.append(1), flush="clean") == 500.0
    assert len(calls) == 3
    # the clean flush only read the buffer: do_bench's ones are still there
    assert bool((fake_triton.caches[-1] == 1).all())
    assert driver.clear_cache == original and "clear_cache" not in vars(driver)
    # the old behaviour: do_bench's own zero-fill
    assert bc.bench_us(lambda: None, flush="zero") == 500.0
    assert int(fake_triton.caches[-1].abs().sum()) == 0
    with bc.l2_flush("clean"):
        assert fake_triton.runtime.driver.active.clear_cache is bc.read_flush
    assert driver.clear_cache == original and "clear_cache" not in vars(driver)
    with bc.l2_flush("zero"):
        assert driver.clear_cache == original


def test_clean_flush_is_undone_when_the_timing_raises(fake_triton):
    import bench_common as bc

    driver = fake_triton.runtime.driver.active

    def broken(fn, **kw):
        assert fake_triton.runtime.driver.active.clear_cache is bc.read_flush
        raise RuntimeError("boom")

    fake_triton.testing.do_bench = broken
    with pytest.raises(RuntimeError, match="boom"):
        bc.bench_us(lambda: None, flush="clean")
    assert "clear_cache" not in vars(driver) and driver.clear_cache.__func__ is \
        _FakeDriver.clear_cache
    # a driver whose clear_cache is its own attribute gets that attribute back
    own = lambda cache: None  # noqa: E731
    driver.clear_cache = own
    with pytest.raises(KeyError), bc.l2_flush("clean"):
        raise KeyError("x")
    assert driver.clear_cache is own


def test_clean_flush_without_the_driver_hook_says_so(fake_triton):
    import bench_common as bc

    fake_triton.runtime.driver.active = types.SimpleNamespace(
        get_empty_cache_for_benchmark=lambda: None)
    with pytest.raises(RuntimeError, match=r"no triton.runtime.driver.active.clear_cache.*"
                                           r"--flush zero"):
        with bc.l2_flush("clean"):
            pass
    with pytest.raises(ValueError, match="flush must be one of"):
        with bc.l2_flush("dirty"):
            pass


def test_read_flush_wants_a_buffer_beyond_the_l2():
    import bench_common as bc

    with pytest.raises(ValueError, match="does not flush"):
        bc.read_flush(torch.ones(60 * 2**20 // 4, dtype=torch.int32))  # 60 MiB < 2 x 50 MiB
    buf = torch.full((256 * 2**20 // 4,), 7, dtype=torch.int32)
    bc.read_flush(buf)
    assert bool((buf == 7).all())


def test_bench_w4a16_arguments():
    bw = importlib.import_module("bench_w4a16")
    a = bw.parse_args(["--grid", "issue25"])
    assert a.shapes == ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 4096))
    assert a.ms == (1, 16, 64, 256, 2048)
    assert a.patterns == ("w4a16_g128_zp", "w4a16_g128_sym", "w8a16_pc")
    assert a.acts == ("bf16", "fp16")
    assert a.impls == ("qcompile", "cublas_bf16", "read_floor", "marlin")
    assert a.flush == "clean" and a.no_variants
    # flags beside the preset override its parts
    a = bw.parse_args(["--grid", "issue25", "--ms", "1", "--act", "fp16", "--flush", "zero",
                       "--shapes", "4096x4096"])
    assert (a.ms, a.acts, a.flush, a.shapes) == ((1,), ("fp16",), "zero", ((4096, 4096),))
    a = bw.parse_args([])
    assert a.acts == ("bf16",) and a.flush == "clean" and not a.no_variants
    assert "w4a16_g128_sym" in a.patterns and a.impls == bw.IMPLS
    for bad in (["--act", "fp32"], ["--flush", "dirty"], ["--patterns", "w4a16_g64"],
                ["--grid", "nope"]):
        with pytest.raises(SystemExit):
            bw.parse_args(bad)


def test_bench_w4a16_rows_record_flush_and_act():
    bw = importlib.import_module("bench_w4a16")
    meta = {"bench": "bench_w4a16", "commit": "abc"}
    r = bw.make_row(meta, "w4a16_g128_sym", "fp16", 4096, 4096, 16, "cublas_bf16", 12.345,
                    "clean")
    assert r["flush"] == "clean" and r["act"] == "fp16" and r["impl"] == "cublas_bf16"
    assert r["median_us"] == 12.35 and r["pattern"] == "w4a16_g128_sym" and r["commit"] == "abc"
    r = bw.make_row(meta, "w4a16_g128_zp", "bf16", 4096, 4096, 1, "qcompile", 10.0, "zero",
                    config="decode.x")
    assert r["flush"] == "zero" and "act" not in r and r["config"] == "decode.x"
    with pytest.raises(ValueError):
        bw.make_row(meta, "w4a16_g128_zp", "bf16", 1, 1, 1, "qcompile", 1.0, "dirty")


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["w4a16_g128_zp", "w4a16_g128_sym", "w8a16_pc"])
def test_bench_w4a16_weights(pattern, act):
    """The eager module, the dequantized weight and qcompile's format agree; scales and the
    weight are in the activation dtype; the symmetric pattern is signed int4 without zeros."""
    bw = importlib.import_module("bench_w4a16")
    n, k = 32, 256
    fmt, w, mod = bw.make_weights(pattern, n, k, act, device="cpu")
    assert w.dtype == act and w.shape == (n, k) and fmt["s"].dtype == act
    q = fmt["q"].to(torch.float32)
    s = fmt["s"].to(torch.float32).repeat_interleave(fmt["group"], dim=1)
    z = 0 if fmt["z"] is None else fmt["z"].to(torch.float32).repeat_interleave(fmt["group"], 1)
    torch.testing.assert_close(w.float(), ((q - z) * s).to(act).float(), rtol=0, atol=0)
    if pattern == "w4a16_g128_sym":
        assert fmt["signed"] and fmt["zero_mode"] == "none" and fmt["z"] is None
        assert fmt["bits"] == 4 and fmt["group"] == 128
        assert int(fmt["q"].min()) == -8 and int(fmt["q"].max()) == 7
        assert mod.packed.dtype == torch.uint8 and mod.packed.shape == (n, k // 2)
    x = torch.randn(3, k).to(act)
    out = mod(x)
    assert out.dtype == act
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w))


def test_bench_w4a16_ratio_table():
    bw = importlib.import_module("bench_w4a16")
    res = {("w4a16_g128_sym", "fp16", 4096, 4096, "qcompile", 1): 10.0,
           ("w4a16_g128_sym", "fp16", 4096, 4096, "cublas_bf16", 1): 25.0,
           ("w4a16_g128_sym", "fp16", 4096, 4096, "read_floor", 1): 8.0,
           ("w4a16_g128_sym", "fp16", 4096, 4096, "qcompile", 256): 40.0,
           ("w4a16_g128_sym", "fp16", 4096, 4096, "cublas_bf16", 256): 30.0,
           ("w4a16_g128_sym", "fp16", 4096, 4096, "read_floor", 256): 8.0}
    [(p, a, nk, cells)] = bw.ratio_rows(res, (1, 16, 256))
    assert (p, a, nk) == ("w4a16_g128_sym", "fp16", "4096x4096")
    assert cells == {1: (10.0, 2.5, 1.25), 256: (40.0, 0.75, None)}


def test_bench_w8a8_arguments_and_rows():
    bw8 = importlib.import_module("bench_w8a8")
    assert bw8.parse_args([]).flush == "clean"
    assert bw8.parse_args(["--flush", "zero"]).flush == "zero"
    with pytest.raises(SystemExit):
        bw8.parse_args(["--flush", "dirty"])
    r = bw8.make_row({"commit": "abc"}, "w8a8_dynamic", 4096, 4096, 1, "qcompile", 29.71, "clean")
    assert r["flush"] == "clean" and r["bench"] == "w8a8" and r["median_us"] == 29.71


def test_bench_w8a8_table_reads_one_flush(tmp_path, capsys):
    """--table-from shows --flush's rows; rows without "flush" count as zero-fill ones."""
    bw8 = importlib.import_module("bench_w8a8")
    base = {"bench": "w8a8", "pattern": "w8a8_static", "n": 4096, "k": 4096, "m": 1,
            "impl": "qcompile", "device": "H100", "torch": "2.11"}
    rows = [dict(base, median_us=11.0, date="2026-12-01"),
            dict(base, median_us=22.0, date="2026-12-02", flush="clean")]
    path = tmp_path / "w8a8.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bw8.table_from(path, bw8.parse_args(["--flush", "zero"]))
    assert "| 11.0 |" in capsys.readouterr().out
    bw8.table_from(path, bw8.parse_args([]))
    assert "| 22.0 |" in capsys.readouterr().out


def test_bench_w4a16_nf4_weights():
    """The NF4 pattern: the eager module's weight is table[c] * absmax per 64, and the
    lookup-table op on qcompile's format gives the same numbers."""
    from qcompile.lowering.lookup_table import code_table

    bw = importlib.import_module("bench_w4a16")
    n, k = 32, 256
    fmt, w, mod = bw.make_weights("nf4_b64", n, k, torch.bfloat16, device="cpu")
    c = fmt["codes"].long()
    ref = (code_table("nf4")[c] * fmt["s"].repeat_interleave(64, dim=1)).to(torch.bfloat16)
    assert fmt["lut"] and fmt["group"] == 64 and torch.equal(w, ref)
    assert mod.packed.shape == (n, k // 2)
    x = torch.randn(3, k).to(torch.bfloat16)
    from qcompile.kernels import ops
    out = torch.ops.qcompile.lut_gemm(x, ops.pack_nk(fmt["codes"], 4), fmt["table"], fmt["s"],
                                      None, 64, "float32", ops.REFERENCE_LAYOUT, "")
    torch.testing.assert_close(out, mod(x), rtol=0, atol=0)


def test_bench_tp_two_cpu_ranks(tmp_path):
    """bench_tp under torchrun with two gloo ranks: every rank's quantized linears taken over,
    the first step's logits the unsharded model's, one row per cell from rank 0."""
    out = tmp_path / "tp.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(_free_port()), str(BENCH / "bench_tp.py"), "--device", "cpu",
         "--config", "tiny", "--layers", "2", "--formats", "bf16,w4a16,nf4", "--batch", "1",
         "--prompt", "8", "--new", "2", "--group-size", "32", "--check", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["format"] for r in rows] == ["bf16", "w4a16", "nf4"]
    for r in rows:
        assert r["bench"] == "tp_decode" and r["world_size"] == 2 and r["tokens_per_s"] > 0
        assert r["all_taken_over"] and max(r["check_rel_err"]) < 2e-2, r
    assert rows[1]["matched"] == ["15/15", "15/15"] and rows[0]["impl"] == "inductor"


def test_ab_decode_swaps_libraries_and_refuses_a_missing_one():
    """The decode A/B installs exactly one variant's libraries (decode kernel, lookup-table
    decode kernel and GEMM builds), and a cell that loaded one the variant lacks (it would time
    this tree's under another name) fails."""
    import pytest

    import ab_decode
    from qcompile.kernels import lut_gemm
    from qcompile.kernels import mixed_gemm_decode as decode
    build = decode.DecodeBuild("bf16", 4, decode.LAYOUT_SM90, decode.MODE_GROUPZERO)
    saved = dict(decode._libs), dict(lut_gemm._libs), dict(lut_gemm._gemm_libs)
    try:
        a = {"decode": {build: "lib-a"}, "lut": {}, "lut_gemm": {("cfg", (1,)): "gemm-a"}}
        b = {"decode": {build: "lib-b"}, "lut": {}, "lut_gemm": {("cfg", (1,)): "gemm-b"}}
        ab_decode._install(a)
        assert decode._libs == {build: "lib-a"} and lut_gemm._libs == {}
        assert lut_gemm._gemm_libs == {("cfg", (1,)): "gemm-a"}
        ab_decode._install(b)
        assert decode._libs[build] == "lib-b" and lut_gemm._gemm_libs[("cfg", (1,))] == "gemm-b"
        ab_decode._check_installed(b)
        lut_gemm._gemm_libs[("other", (1,))] = "a GEMM build loaded during the cell"
        with pytest.raises(RuntimeError, match="not loaded with"):
            ab_decode._check_installed(b)
        ab_decode._install(b)
        lut_gemm._libs["bf16"] = "loaded during the cell"
        with pytest.raises(RuntimeError, match="not loaded with"):
            ab_decode._check_installed(b)
    finally:
        decode._libs.clear(), decode._libs.update(saved[0])
        lut_gemm._gemm_libs.clear(), lut_gemm._gemm_libs.update(saved[2])
        lut_gemm._libs.clear(), lut_gemm._libs.update(saved[1])
