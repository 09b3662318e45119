"""benchmarks/bench_gptfast.py on CPU: gpt-fast's decode loop (the function
``decode_one_token(model, x, input_pos)`` compiled with mode="reduce-overhead",
fullgraph=True, gpt-fast's Inductor config lines) on the tiny config, every format, with
backend="qcompile". On the GPU the same script is the measurement; here it has to run, give
the numbers of the eager model, and be taken over where the GPU's Inductor would hide the
matmuls."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOL, rel_err
from torch.nn.attention import SDPBackend, sdpa_kernel

import qcompile

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
INDUCTOR_LINES = ("coordinate_descent_tuning", "triton.unique_kernel_names", "fx_graph_cache")


@pytest.fixture(scope="module")
def bench():
    """The bench module, its import-time Inductor config lines in force for this file's tests
    and undone afterwards."""
    cfg = torch._inductor.config
    current = cfg.get_config_copy()
    with cfg.patch({k: current[k] for k in INDUCTOR_LINES}):
        if str(BENCH_DIR) not in sys.path:
            sys.path.insert(0, str(BENCH_DIR))
        if "bench_gptfast" in sys.modules:  # run its config lines again
            module = importlib.reload(sys.modules["bench_gptfast"])
        else:
            module = importlib.import_module("bench_gptfast")
        assert cfg.coordinate_descent_tuning and cfg.triton.unique_kernel_names
        yield module


@torch.no_grad()
def _eager_replay(bench, fmt: str, batch: int, prompt: int, steps: int, trace: dict):
    """A freshly built model (same seed) run eagerly through the compiled run's tokens: the
    logits of each decode step."""
    model = bench.build_model("tiny", None, fmt, "cpu")
    model.setup_caches(batch, prompt + steps)  # as run_cell: the same cache length
    first = bench.prefill(model, trace["prompt"], torch.arange(prompt))
    assert torch.equal(first, trace["first"])  # both eager: the same token
    pos = torch.tensor([prompt], dtype=torch.int)
    x, out = first.view(batch, -1), []
    for tok in trace["tokens"]:
        out.append(bench.decode_one_token(model, x, pos)[1].float())
        pos += 1
        x = tok
    return out


@pytest.mark.parametrize("fmt", ["bf16", "w4a16", "w4a16_qc", "w8a16", "w8a8", "nf4"])
def test_gptfast_decode_runs_and_matches_eager(bench, fmt):
    trace: dict = {}
    prompt, batch, warmup = 8, 2, 3
    row = bench.run_cell("tiny", None, fmt, "qcompile", batch, prompt, new=2, device="cpu",
                         warmup=warmup, check=True, trace=trace)
    assert row["bench"] == "gptfast_decode" and row["impl"] == "qcompile"
    assert row["tokens_per_s"] > 0 and row["ms_per_token"] > 0
    assert row["settings"]["compiled"] == "function"
    assert row["settings"]["mode"] == "reduce-overhead" and row["settings"]["fullgraph"]
    assert all(row["settings"]["inductor_config"][k] for k in INDUCTOR_LINES)
    # every linear of the tiny model (2 layers x wqkv, wo, w1, w2, w3, and the output head)
    assert row["quantized_linears"] == (0 if fmt == "bf16" else 11)
    assert row["matmuls"] >= row["matched"] >= 0
    assert len(trace["tokens"]) == warmup and len(trace["timed_tokens"]) == 2
    eager = _eager_replay(bench, fmt, batch, prompt, warmup + 2, trace)
    for step, (out, ref) in enumerate(zip(trace["logits"], eager)):
        err = rel_err(out, ref)
        assert err < TOL[torch.bfloat16], f"{fmt} step {step}: rel err {err:.4f}"
    assert row["check_rel_err"] < TOL[torch.bfloat16]  # the bench's own replay agrees


def _one_token_mm_decomposition(original):
    """What Inductor's ``mm`` decomposition does on a GPU under
    ``coordinate_descent_tuning`` (gpt-fast sets it): a one-row (or one-column) matmul becomes
    a broadcast multiply and a sum over K, in float32 (``pw_cast_for_opmath``). On CPU
    Inductor leaves these matmuls alone, so the test installs it."""
    from torch._decomp.decompositions import pw_cast_for_opmath
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    @pw_cast_for_opmath
    def mul_sum(a, b):
        return (a.unsqueeze(2) * b.unsqueeze(0)).sum(dim=1)

    def mm(a, b):
        if statically_known_true(a.shape[0] == 1) or statically_known_true(b.shape[1] == 1):
            return mul_sum(a, b)
        return original(a, b) if original is not None else NotImplemented
    return mm


@pytest.fixture
def gpu_mm_decomposition():
    from torch._inductor import decomposition
    decompositions = decomposition.decompositions
    # Inductor reads the table through fast_random_decomps(), a functools.cache'd copy of
    # `decompositions` made at its first compile: drop the copy so the entry is seen, and
    # again afterwards so the original is
    clear = getattr(getattr(decomposition, "fast_random_decomps", None), "cache_clear",
                    lambda: None)
    key = torch.ops.aten.mm.default
    original = decompositions.get(key)
    decompositions[key] = _one_token_mm_decomposition(original)
    clear()
    try:
        assert decomposition.select_decomp_table()[key] is decompositions[key]
        yield
    finally:
        if original is None:
            decompositions.pop(key, None)
        else:
            decompositions[key] = original
        clear()


@pytest.mark.parametrize("fmt", ["w4a16_qc", "w8a16", "w8a8", "nf4"])
def test_gptfast_batch1_taken_over_under_gpu_mm_decomposition(bench, gpu_mm_decomposition, fmt):
    """The user's report: gpt-fast's loop at batch 1 on a GPU, nothing taken over. Inductor's
    GPU decomposition turns each one-token matmul into mul + sum before qcompile's pass sees
    the graph; every quantized linear must still be taken over."""
    row = bench.run_cell("tiny", None, fmt, "qcompile", 1, prompt=8, new=1, device="cpu",
                         warmup=2, check=True)
    assert row["quantized_linears"] == 11
    assert row["matched"] == row["quantized_linears"], (
        f"{fmt}: {row['matched']} of {row['quantized_linears']} quantized linears taken over "
        f"({row['matmuls']} matmuls in the report)")
    assert row["all_taken_over"]
    assert row["check_rel_err"] < TOL[torch.bfloat16]


def test_bench_gptfast_cli_smoke(tmp_path):
    """The script as the GPU runs it: one JSON row per cell with the fields the notes read,
    bf16 with Inductor only, and the table."""
    out = tmp_path / "gptfast.jsonl"
    res = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench_gptfast.py"), "--device", "cpu", "--config",
         "tiny", "--layers", "1", "--prompt", "8", "--new", "2", "--warmup", "2", "--batch", "1",
         "--formats", "bf16,w8a16", "--impls", "inductor,qcompile", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["format"], r["impl"]) for r in rows] == [
        ("bf16", "inductor"), ("w8a16", "inductor"), ("w8a16", "qcompile")], rows
    fields = {"bench", "format", "batch", "impl", "tokens_per_s", "ms_per_token", "peak_mem_gb",
              "matched", "matmuls", "quantized_linears", "layers", "settings", "device",
              "torch", "commit", "date", "command"}
    for r in rows:
        assert fields <= r.keys(), fields - r.keys()
        assert "error" not in r, r["error"]
        assert r["bench"] == "gptfast_decode" and r["layers"] == 1 and r["tokens_per_s"] > 0
    assert rows[0]["quantized_linears"] == 0 and rows[2]["quantized_linears"] == 6
    assert rows[1]["matched"] is None and rows[2]["matched"] is not None
    assert "x bf16" in res.stdout and "1.00x" in res.stdout


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fmt", ["w4a16_qc", "w8a8", "nf4"])
def test_gptfast_compiled_prefill_taken_over(bench, fmt, device):
    """gpt-fast's --compile_prefill: its prefill function compiled with fullgraph=True and
    dynamic=True, so that one graph serves every prompt length. Every quantized linear is taken
    over in that graph, and two prompt lengths through it (past the decode kernels' 32 tokens:
    on an H100 the prefill GEMMs) give the eager model's logits."""
    model = bench.build_model("tiny", None, fmt, device)
    model.setup_caches(max_batch_size=1, max_seq_length=128)

    def prefill_logits(model, x, input_pos):  # gpt-fast's prefill, the logits kept
        return model(x, input_pos)

    compiled = torch.compile(prefill_logits, fullgraph=True, dynamic=True, backend="qcompile")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for i, prompt in enumerate((40, 72)):
            x = torch.randint(0, 512, (1, prompt), generator=g).to(device)
            pos = torch.arange(prompt, device=device)
            with qcompile.collect() as report:
                out = compiled(model, x, pos)
            if i == 0:  # compiled once, at the first prompt, with the prompt length symbolic
                assert len(report.matched) == bench.quantized_linears(model) == 11, str(report)
                if device == "cuda" and torch.cuda.get_device_capability() == (9, 0) and fmt == "nf4":
                    assert all("sm90 lookup-table GEMM (nf4" in r.kernel for r in report.matched), str(report)
            else:
                assert len(report) == 0, "a second prompt length must not recompile"
            ref = prefill_logits(model, x, pos)
            assert out.shape == ref.shape == (1, prompt, 512)
            err = rel_err(out.float(), ref.float())
            assert err < TOL[torch.bfloat16], f"{fmt} prompt {prompt}: rel err {err:.4f}"
