"""options={"fuse_linears": True}: quantized linears that read one activation in one format
run as one qcompile op on the concatenated weights (CPU, reference kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_backend import QC_OPS, GraphSpy, rel_err

import qcompile
from llama_model import CONFIGS, Llama

MIXED = torch.ops.qcompile.mixed_gemm.default


def _llama(method):
    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"]).to(torch.bfloat16)
    if method == "w8a8_asym":
        qcompile.quantize(model, "w8a8", act="dynamic_asym")
    elif method == "nf4":
        qcompile.quantize(model, "nf4", block_size=64)
    else:
        qcompile.quantize(model, method, group_size=64)
    model.setup_caches(1, 32)
    return model


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8", "w8a8_asym", "nf4"])
def test_decoder_runs_qkv_and_gate_up_as_one_launch_each(method):
    """W8A8 linears quantize their input each: q/k/v's three quantizations are one value
    (value numbering), so they share one int8 op and the other two quantizations go."""
    model = _llama(method)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 6))
    pos = torch.arange(6)
    with torch.no_grad():
        ref = model(tokens, pos)
        outs = {}
        for fuse in (False, True):
            model.setup_caches(1, 32)
            torch._dynamo.reset()
            spy = GraphSpy()
            with spy.installed():
                compiled = torch.compile(model, backend="qcompile", options={"fuse_linears": fuse})
                outs[fuse] = compiled(tokens, pos)
            report = qcompile.last_report()
            targets = spy.graphs[0][0]
            # 2 layers x (q/k/v, o, gate/up, down) + the head when fused, 15 ops otherwise
            assert sum(t in QC_OPS for t in targets) == (9 if fuse else 15)
            if method.startswith("w8a8") and fuse:  # one activation quantization a launch
                assert sum(t is torch.ops.aten.amax.default for t in targets) == 9, targets
            assert len(report.matched) == len(report) == 15
            together = [r for r in report.records if "one launch with" in r.kernel]
            assert len(together) == (10 if fuse else 0), str(report)
    assert rel_err(outs[True], ref) <= 2e-2
    assert rel_err(outs[True], outs[False]) <= 1e-2


class _Heads(nn.Module):
    """Three linears on one input: a and b in one format (with biases), c in another."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(128, 64), nn.Linear(128, 32)
        self.c = nn.Linear(128, 48, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], dim=-1).relu()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_only_same_format_fuses_and_biases_are_concatenated(dynamic):
    torch.manual_seed(0)
    model = _Heads()
    qcompile.quantize(model, "w4a16", group_size=64, skip=("c",))
    qcompile.quantize(model, "w8a16", skip=("a", "b"))
    spy = GraphSpy()
    compiled = torch.compile(model, backend="qcompile", dynamic=dynamic,
                             options={"fuse_linears": True})
    with torch.no_grad(), spy.installed(), qcompile.collect() as report:
        for m in ((3, 5) if dynamic else (3,)):
            x = torch.randn(m, 128)
            assert rel_err(compiled(x), model(x)) <= 2e-2, m
    assert [r.matched for r in report.records] == [True] * 3
    kernels = {r.source: r.kernel for r in report.records}
    assert "one launch with" in kernels["a"] and "one launch with" in kernels["b"]
    assert "one launch with" not in kernels["c"]  # w8a16: another format
    assert sum(t in QC_OPS for t in spy.graphs[0][0]) == 2


def test_option_is_checked():
    # Dynamo wraps the backend's TypeError (BackendCompilerFailed)
    with pytest.raises(Exception, match="options\\['fuse_linears'\\] must be a bool"):
        torch.compile(nn.Linear(4, 4), backend="qcompile",
                      options={"fuse_linears": "yes"})(torch.randn(2, 4))


def test_value_numbers_merge_pure_ops_only():
    """The numbering W8A8 fusion relies on: the same pure op on the same inputs is one value
    (also through a chain), random ops and placeholders are each their own."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from qcompile.lowering.rewrite import _value_numbers

    def f(x, y):
        a, b = (x * 2).abs(), (x * 2).abs()      # one value, computed twice
        c = (y * 2).abs()                        # another input: another value
        r1, r2 = torch.rand_like(x), torch.rand_like(x)  # never merged
        return a, b, c, r1, r2

    gm = make_fx(f)(torch.randn(4), torch.randn(4))
    num = _value_numbers(gm.graph)
    a, b, c, r1, r2 = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert num[a] == num[b]
    assert num[c] != num[a]
    assert num[r1] != num[r2]
    x, y = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert num[x] != num[y]


@pytest.mark.parametrize("method", ["w4a16", "w8a16"])
def test_decode_step_gate_and_up_become_one_gated_op(method):
    """At decode token counts a weight-only SwiGLU MLP's gate and up projections run as one
    qcompile::mixed_gemm_gated (rows interleaved; silu(gate) * up inside), not one GEMM and a
    pointwise kernel; the prompt (more tokens) keeps the plain fused GEMM."""
    model = _llama(method).to(torch.bfloat16)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 12))
    with torch.no_grad():
        for s, gated in ((1, True), (12, False)):
            model.setup_caches(1, 32)
            torch._dynamo.reset()
            spy = GraphSpy()
            with spy.installed():
                out = torch.compile(model, backend="qcompile")(tokens[:, :s], torch.arange(s))
            model.setup_caches(1, 32)
            ref = model(tokens[:, :s], torch.arange(s))
            targets = spy.graphs[0][0]
            n_gated = sum(t is torch.ops.qcompile.mixed_gemm_gated.default for t in targets)
            assert n_gated == (2 if gated else 0)  # one a layer
            lines = [r for r in qcompile.last_report().records if "silu(gate) * up" in r.kernel]
            assert len(lines) == (4 if gated else 0)
            assert rel_err(out, ref) <= 2e-2


@pytest.mark.parametrize("fuse", [True, False])
def test_export_makes_the_backends_fusion(fuse):
    # The exported graph runs what the compiled model runs: a and b (one format) as one op.
    from qcompile.export import rewrite_exported
    from qcompile.lowering.report import Report

    torch.manual_seed(0)
    model = _Heads()
    qcompile.quantize(model, "w4a16", group_size=64, skip=("c",))
    qcompile.quantize(model, "w8a16", skip=("a", "b"))
    x = torch.randn(3, 128)
    report = Report()
    ep = rewrite_exported(model, (x,), report=report, fuse_linears=fuse)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function" and n.target in QC_OPS]
    assert len(ops) == (2 if fuse else 3)
    assert ("one launch with" in report.records[0].kernel) == fuse
    with torch.no_grad():
        assert rel_err(ep.module()(x), model(x)) <= 2e-2
