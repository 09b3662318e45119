"""The backend on CUDA: a quantized decoder compiles to qcompile ops and matches eager,
also under CUDA graphs (mode="reduce-overhead")."""

from __future__ import annotations

import copy

import pytest
import torch

import qcompile
from llama_model import Llama, LlamaConfig

pytestmark = pytest.mark.gpu
CONFIG = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate=512, max_seq_len=128)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8"])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_decoder_on_cuda(method, mode):
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIG).to("cuda", torch.bfloat16), method, group_size=128)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 32), device="cuda")
    with torch.no_grad(), qcompile.collect() as report:
        ref = model(tokens)
        compiled = torch.compile(model, backend="qcompile", mode=mode)
        for _ in range(3):  # CUDA graphs record on a later call
            out = compiled(tokens)
    assert len(report.matched) == len(report) == 15, str(report)
    print(report)
    assert _rel(out, ref) <= 2e-2


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_asymmetric_w8a8_decoder_on_cuda(mode):
    """act="dynamic_asym": every linear matched with its zero-point correction, on the GPU
    kernels, matching eager (which corrects in int32 the same way)."""
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIG).to("cuda", torch.bfloat16), "w8a8",
                              act="dynamic_asym")
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 32), device="cuda")
    with torch.no_grad(), qcompile.collect() as report:
        ref = model(tokens)
        compiled = torch.compile(model, backend="qcompile", mode=mode)
        for _ in range(3):
            out = compiled(tokens)
    assert len(report.matched) == len(report) == 15, str(report)
    assert all("asymmetric" in r.format and r.kernel.startswith("cutlass")
               for r in report.records), str(report)
    assert _rel(out, ref) <= 2e-2


def test_w8a8_decoder_runs_on_cutlass_kernels():
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIG).to("cuda", torch.bfloat16), "w8a8")
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 32), device="cuda")
    report = qcompile.explain(model, tokens)
    assert len(report.matched) == 15
    assert all(r.kernel.startswith("cutlass sm90_") for r in report.records), str(report)


def test_activation_quantization_is_one_triton_kernel():
    """RMSNorm + per-token int8 quantization before the GEMM: one fused kernel, and no
    float32 copy of the activation written to memory."""
    import re

    from torch._inductor.utils import run_and_get_code

    from llama_model import RMSNorm

    dim, m = 4096, 64
    torch.manual_seed(0)
    lin = torch.nn.Linear(dim, 1024, bias=False).to("cuda", torch.bfloat16)
    block = torch.nn.Sequential(RMSNorm(dim, 1e-5), qcompile.SmoothQuantLinear.from_linear(lin))
    block = block.to("cuda", torch.bfloat16)
    x = torch.randn(m, dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(block, backend="qcompile"), x)
        ref = block(x)
    code = "\n".join(codes)
    assert "qcompile.int8_gemm" in code
    kernels = re.findall(r"async_compile\.triton\('(\w+)'", code)
    assert len(kernels) == 1, kernels
    assert f"(({m}, {dim}), ({dim}, 1), torch.float32)" not in code
    assert _rel(out, ref) <= 2e-2


def _mlp(method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.SiLU(),
                                torch.nn.Linear(2048, 1024)).to("cuda", torch.bfloat16)
    return qcompile.quantize(model, method, group_size=128)


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8"])
def test_max_autotune_dispatches_by_token_count_without_recompiling(method):
    model = _mlp(method)
    compiled = torch.compile(model, backend="qcompile", options={"max_autotune_gemm": True})
    with torch.no_grad(), qcompile.collect() as report:
        for m in (8, 2, 17, 300, 2048):
            xm = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(xm, 0)
            # eager W8A8 uses torch._int_mm, which refuses M <= 16: pad its rows
            ref = model(torch.nn.functional.pad(xm, (0, 0, 0, max(0, 17 - m))))[:m]
            assert _rel(compiled(xm), ref) <= 2e-2, m
    print(report)
    assert report.graphs == 1  # one compile served every M
    assert len(report.matched) == 2
    # symbolic M: a table by token-count range, measured per bucket above the decode kernel's
    # token counts (M <= 8 keeps the heuristic, untimed)
    assert all(r.kernel.startswith(("cutlass sm90 autotuned: 9-", "cutlass sm80 autotuned: 9-",
                                    "cutlass autotuned: 9-")) for r in report.matched), str(report)


@pytest.mark.parametrize("method", ["w4a16", "w8a16"])
def test_compute_capability_8_selects_the_sm80_family(monkeypatch, method):
    from qcompile import kernels
    monkeypatch.setattr(kernels, "device_capability", lambda device: (8, 0))
    model = _mlp(method)
    x = torch.randn(33, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        report = qcompile.explain(model, x)
        out = torch.compile(model, backend="qcompile")(x)
    print(report)
    assert len(report.matched) == 2
    assert all(r.kernel.startswith("cutlass sm80") for r in report.matched), str(report)
    assert _rel(out, model(x)) <= 2e-2


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8"])
def test_kv_cache_decode_records_cuda_graphs(method):
    """The decode step writes the KV cache (buffers): under freezing they must still count
    as static inputs, or CUDA graphs are skipped ("mutated inputs") and every launch pays
    Python overhead."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIG).to("cuda", torch.bfloat16), method, group_size=128)
    model.setup_caches(1, 64)
    n = 24  # eager W8A8 (torch._int_mm) needs more than 16 tokens for the prompt
    prompt = torch.randint(0, CONFIG.vocab_size, (1, n), device="cuda")
    counters.clear()
    with torch.no_grad():
        tok = model(prompt, torch.arange(n, device="cuda"))[:, -1:].argmax(-1)
        step = torch.compile(model, backend="qcompile", mode="reduce-overhead", fullgraph=True)
        eager = copy.deepcopy(model)
        for i in range(6):
            pos = torch.tensor([n + i], device="cuda")
            out = step(tok, pos)
            assert torch.isfinite(out).all()
            if method != "w8a8":  # eager W8A8 (torch._int_mm) cannot run one token
                ref = eager(tok, pos)
                assert _rel(out, ref) <= 2e-2, i
                out = ref
            tok = out[:, -1:].argmax(-1)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


AMBIENT = {  # settings made on the config modules before compiling (tests/test_takeover.py)
    "inductor-freezing": ({"freezing": True}, {}),
    "dynamo-prepare-freezing": ({}, {"prepare_freezing": True}),
}


@pytest.mark.parametrize("setting", list(AMBIENT))
@pytest.mark.parametrize("method", ["w4a16", "w8a8", "nf4"])
def test_decode_step_under_ambient_freezing(setting, method):
    """With freezing set on Inductor's config (or Dynamo's prepare_freezing), Dynamo installs the
    weights on the graph module: every linear still taken over on the CUDA kernels, the KV cache
    still a static input of the CUDA graphs (no skips), and the steps match the model compiled
    without the setting."""
    from torch._dynamo.utils import counters
    inductor, dynamo = AMBIENT[setting]
    torch.manual_seed(0)
    kw = {"block_size": 64} if method == "nf4" else {"group_size": 128}
    model = qcompile.quantize(Llama(CONFIG).to("cuda", torch.bfloat16), method, **kw)
    model.setup_caches(1, 64)
    n = 24
    prompt = torch.randint(0, CONFIG.vocab_size, (1, n), device="cuda")
    with torch.no_grad():
        tok = model(prompt, torch.arange(n, device="cuda"))[:, -1:].argmax(-1)
        plain = copy.deepcopy(model)
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(inductor), torch._dynamo.config.patch(dynamo), \
                qcompile.collect() as report:
            step = torch.compile(model, backend="qcompile", mode="reduce-overhead", fullgraph=True)
            outs = [step(tok, torch.tensor([n + i], device="cuda")).clone() for i in range(4)]
        skips = counters["inductor"]["cudagraph_skips"]
        plain_step = torch.compile(plain, backend="qcompile", fullgraph=True)
        refs = [plain_step(tok, torch.tensor([n + i], device="cuda")).clone() for i in range(4)]
    assert len(report.matched) == len(report) == 15, str(report)
    assert not any(r.kernel.startswith("reference") for r in report.records), str(report)
    assert skips == 0
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert _rel(o, r) <= 2e-2, i


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8"])
def test_fuse_linears_decode_step_matches_eager(method):
    """options={"fuse_linears": True}: q/k/v and gate/up as one launch each (on the GPU
    kernels, the decode kernel at one token), under CUDA graphs, against eager (W8A8: against
    the unfused compiled model, since eager torch._int_mm cannot take one token)."""
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIG).to("cuda", torch.bfloat16), method, group_size=128)
    model.setup_caches(1, 64)
    n = 24
    prompt = torch.randint(0, CONFIG.vocab_size, (1, n), device="cuda")
    # torch.compile takes mode or options, not both: CUDA graphs through the option
    options = {"triton.cudagraphs": True}
    with torch.no_grad():
        tok = model(prompt, torch.arange(n, device="cuda"))[:, -1:].argmax(-1)
        step = torch.compile(model, backend="qcompile", fullgraph=True,
                             options={**options, "fuse_linears": True})
        with qcompile.collect() as report:
            step(tok, torch.tensor([n], device="cuda"))  # compiles; slot n is written again
        eager = copy.deepcopy(model)  # the same cache from here on
        if method == "w8a8":
            eager = torch.compile(eager, backend="qcompile", fullgraph=True,
                                  options={**options, "fuse_linears": False})
        for i in range(5):
            pos = torch.tensor([n + i], device="cuda")
            out = step(tok, pos).clone()  # (W8A8) the next graph's replay reuses its memory
            ref = eager(tok, pos).clone()
            assert _rel(out, ref) <= 2e-2, i
            tok = ref[:, -1:].argmax(-1)
    assert len(report.matched) == len(report) == 15
    fused = [r for r in report.records if "one launch with" in r.kernel]
    assert len(fused) == 10 and all(not r.kernel.startswith("reference") for r in fused), str(report)


@pytest.mark.parametrize("method", ["w4a16", "w8a16"])
@pytest.mark.parametrize("m", [1, 8, 24])
def test_gated_mlp_runs_as_one_gated_op_at_decode(method, m):
    """A SwiGLU MLP's gate and up projections become one qcompile::mixed_gemm_gated for the
    decode kernels' token counts (silu(gate) * up in its epilogue), plain fused GEMMs beyond."""
    import qcompile

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Linear(512, 1024, bias=False)
            self.w3 = torch.nn.Linear(512, 1024, bias=False)
            self.w2 = torch.nn.Linear(1024, 512, bias=False)

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    torch.manual_seed(0)
    model = MLP().cuda().to(torch.bfloat16)
    qcompile.quantize(model, method, group_size=128)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x).double()
        torch._dynamo.reset()
        out = torch.compile(model, backend="qcompile")(x).double()
    gated = [line for line in str(qcompile.last_report()).splitlines() if "silu(gate)" in line]
    assert len(gated) == (2 if m <= 8 else 0)
    assert float((out - ref).norm() / ref.norm()) <= 1e-2


@pytest.mark.parametrize("method", ["w4a16", "w8a16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_norms_and_skips_in_the_decode_kernel(method, batch):
    """The reference Llama's decode step on the GPU: every RMSNorm goes into the op that reads
    it and every skip connection into the op whose result it adds (the report says so), the
    ops run the decode kernel (no "reference" line), and the logits match eager's."""
    import qcompile
    from llama_model import CONFIGS, Llama

    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"]).cuda().to(torch.bfloat16)
    qcompile.quantize(model, method, group_size=64)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (batch, 1), device="cuda")
    pos = torch.tensor([5], device="cuda")
    with torch.no_grad():
        model.setup_caches(batch, 16)
        ref = model(tokens, pos).double()
        model.setup_caches(batch, 16)
        torch._dynamo.reset()
        out = torch.compile(model, backend="qcompile")(tokens, pos).double()
    records = qcompile.last_report().records
    assert sum("RMSNorm in the op" in r.kernel for r in records) == 2 * 5 + 1
    assert sum("+ residual in the op" in r.kernel for r in records) == 2 * 2
    # after the first layer's q/k/v every norm's input comes from the op before's epilogue
    assert sum("its sums from the op before" in r.kernel for r in records) == 2 * 5 + 1 - 3
    assert sum("next RMSNorm's input from its epilogue" in r.kernel for r in records) == 2 * 2
    assert not any(r.kernel.startswith("reference") for r in records), str(qcompile.last_report())
    assert float((out - ref).norm() / ref.norm()) <= 2e-2
