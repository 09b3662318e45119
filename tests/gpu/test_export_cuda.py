"""Export / load on CUDA: the loaded artifact runs the qcompile CUDA kernels (the decode
kernels for a token, CUTLASS for many), matches the model it was exported from, and a
decode step loaded in a fresh process generates the compiled model's tokens.

The default artifact (``package="program"``) needs no AOTInductor loader. The ``"aoti"``
kind is tried in a child process only: its loader segfaults on the H100 image's torch 2.11;
there it is an expected failure, elsewhere it must work. Exporting it needs a C++ compiler
that links libstdc++ dynamically: where $CXX links it statically (the H100 image's
/opt/gcc/bin/g++), export raises ExportError; run with CXX=/usr/bin/g++."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import qcompile
from qcompile.export import read_metadata

pytestmark = pytest.mark.gpu

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_export.py"


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels one call of fn launches."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


def _mlp(method: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    return qcompile.quantize(model.to("cuda", torch.bfloat16), method, group_size=128)


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8", "nf4"])
def test_round_trip_runs_the_cuda_kernels(method, tmp_path):
    model = _mlp(method)
    path = tmp_path / f"{method}.pt2"
    m = torch.export.Dim("m", min=1, max=1024)
    x8 = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    qcompile.export(model, (x8,), path, dynamic_shapes=({0: m},))
    meta = read_metadata(path)
    assert meta["package"] == "program" and meta["target"]["device"] == "cuda"
    assert meta["target"]["arch"] == "sm_{}{}".format(*torch.cuda.get_device_capability())
    assert [r["matched"] for r in meta["report"]] == [True, True], meta["report"]

    eager = qcompile.load(path, compile=False)  # the graph through the dispatcher
    compiled = qcompile.load(path)              # and compiled by Inductor
    # (NF4 beyond the decode kernel: the lookup-table GEMM on Hopper, else dequantize + cuBLAS;
    # on Hopper its program carries the GEMM's scales in bf16, the op's gemm_scales)
    big = "GemmUniversal" if method != "nf4" or torch.cuda.get_device_capability() == (9, 0) \
        else "lut_dequant_kernel"
    for tokens, kernel in ((1, "decode_kernel"), (7, "decode_kernel"), (300, big)):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = model(x)
            for loaded in (eager, compiled):
                out = loaded(x)
                assert out.shape == ref.shape and out.dtype == torch.bfloat16
                assert _rel(out, ref) <= 1e-2, (tokens, _rel(out, ref))
                names = _cuda_kernels(lambda: loaded(x))  # noqa: B023
                assert any(kernel in n for n in names), (tokens, names)


def test_llama_dynamic_batch_and_kv_cache_on_the_gpu(tmp_path):
    """A decode step exported with a dynamic batch: the loaded program writes its own KV
    cache in place and matches the model at batch sizes other than the example's."""
    from llama_model import Llama, LlamaConfig
    cfg = LlamaConfig(vocab_size=1024, dim=512, n_layers=2, n_heads=8, n_kv_heads=2,
                      intermediate=1024, max_seq_len=128)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Llama(cfg).to(torch.bfloat16)
    qcompile.quantize(model, "w4a16", group_size=128)
    model.setup_caches(4, 64)
    batch = torch.export.Dim("batch", min=1, max=4)
    tok = torch.randint(0, 1024, (2, 1), device="cuda")
    path = qcompile.export(model, (tok, torch.tensor([0], device="cuda")), tmp_path / "s.pt2",
                           dynamic_shapes=({0: batch}, None))
    loaded = qcompile.load(path)
    caches = {n.removeprefix("_orig_mod."): b for n, b in loaded.named_buffers()
              if n.endswith("_cache")}
    ours = {n: b for n, b in model.named_buffers() if n.endswith("_cache")}
    for b in (1, 3):
        for c in (*caches.values(), *ours.values()):
            c.zero_()
        with torch.no_grad():
            for pos in range(4):
                t = torch.randint(0, 1024, (b, 1), device="cuda")
                p = torch.tensor([pos], device="cuda")
                assert _rel(loaded(t, p).float(), model(t, p).float()) <= 2e-2
        for name, cache in caches.items():
            assert cache[:b, :, :4].abs().sum() > 0 and not cache[:, :, 4:].any()
            assert _rel(cache[:b, :, :4].float(), ours[name][:b, :, :4].float()) <= 2e-2


@pytest.mark.parametrize("fmt", ["w4a16", "w8a16", "w8a8"])
def test_decode_step_loaded_in_a_fresh_process_generates_the_same_tokens(fmt, tmp_path):
    """benchmarks/bench_export.py on a small model: export in one process, load in another
    (CUDA graphs both), same greedy tokens. Speed is the benchmark's business (its rows),
    not this test's: --tolerance 1 accepts any."""
    out = tmp_path / "rows.jsonl"
    res = subprocess.run(
        [sys.executable, str(BENCH), "--config", "small", "--formats", fmt, "--prompt", "32",
         "--new", "16", "--reps", "1", "--tolerance", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    compiled, loaded = (json.loads(line) for line in out.read_text().splitlines())
    assert loaded["impl"] == "qcompile-export-program" and loaded["same_tokens"] is True
    assert compiled["matched"].split("/")[0] != "0"


_AOTI_CHILD = """
import sys, torch, qcompile
loaded = qcompile.load(sys.argv[1])
x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    torch.save(loaded(x).cpu(), sys.argv[2]); torch.save(x.cpu(), sys.argv[3])
"""


def test_aoti_package_loads_in_a_child_process(tmp_path):
    model = _mlp("w4a16")
    path = tmp_path / "aoti.pt2"
    m = torch.export.Dim("m", min=1, max=1024)
    x8 = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    qcompile.export(model, (x8,), path, dynamic_shapes=({0: m},), package="aoti")
    res = subprocess.run([sys.executable, "-c", _AOTI_CHILD, str(path), str(tmp_path / "y.pt"),
                          str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=600)
    if res.returncode == -signal.SIGSEGV and torch.__version__.startswith("2.11"):
        pytest.xfail("AOTInductor's loader segfaults on this torch 2.11 image (why "
                     "package='program' is the default)")
    assert res.returncode == 0, res.stderr[-3000:]
    x = torch.load(tmp_path / "x.pt").cuda()
    with torch.no_grad():
        assert _rel(torch.load(tmp_path / "y.pt").cuda(), model(x)) <= 1e-2
