"""Takeover under the settings and spellings users run: Inductor settings and modes, a
function compiled instead of a module, the one-token matmul decomposition, the warning when
nothing is taken over, no crash on graphs the pass cannot read, int32 matmuls of int8 values.

The one-token decomposition (``mm`` -> ``(a.unsqueeze(2) * b.unsqueeze(0)).sum(1)``) is what
Inductor's table does on a GPU under ``coordinate_descent_tuning`` (gpt-fast's setting,
``mode="max-autotune"``); the fixture puts the same entry into the table on the CPU.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from conftest import TOL, rel_err
from test_backend import ATEN_MMS, QC_OPS, GraphSpy
from torch import nn

import qcompile
from llama_model import CONFIGS, Llama

aten = torch.ops.aten


def _one_token_mm(a, b, out_dtype=None):
    if a.shape[0] == 1:
        return (a.unsqueeze(2) * b.unsqueeze(0)).sum(dim=1)
    return NotImplemented


@contextlib.contextmanager
def one_token_decomposition():
    """Inductor's GPU decomposition of a one-row mm, in the table on the CPU too."""
    from torch._inductor import decomposition

    table = decomposition.decompositions
    old = table.get(aten.mm.default)
    table[aten.mm.default] = _one_token_mm
    # select_decomp_table() hands out a cached copy of the table (fast_random_decomps)
    cached = getattr(decomposition, "fast_random_decomps", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
    try:
        yield
    finally:
        if old is None:
            del table[aten.mm.default]
        else:
            table[aten.mm.default] = old
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()


@pytest.fixture
def gpu_like_decomposition():
    with one_token_decomposition():
        yield


def _mlp(method: str, dtype=torch.bfloat16, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 64, bias=False)).to(dtype)
    if method == "w4a16":
        kwargs.setdefault("group_size", 64)
    return qcompile.quantize(m, method, **kwargs)


def test_decode_step_function_is_taken_over_under_the_one_token_decomposition(
        gpu_like_decomposition):
    """gpt-fast's shape of a decode loop: a function closing over the model, fullgraph,
    reduce-overhead, batch 1. Without the backend's table this reported 0 of 0."""
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIGS["tiny"]), "w4a16", group_size=64)
    model.setup_caches(max_batch=1, max_seq=16)
    step = torch.compile(lambda tok, pos: model(tok, pos), mode="reduce-overhead",
                         fullgraph=True, backend="qcompile")
    tok, pos = torch.tensor([[3]]), torch.tensor([0])
    with torch.no_grad(), qcompile.collect() as report:
        ref = model(tok, pos)
        out = step(tok, pos)  # writes the same cache entries as the eager call
    assert len(report.matched) == len(report) == 7 * CONFIGS["tiny"].n_layers + 1, str(report)
    assert not report.notes
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_float_matmuls_keep_inductors_decomposition(gpu_like_decomposition):
    """Only matmuls reading a quantized weight are kept whole: a float linear beside them is
    still decomposed into the product and reduction Inductor's entry chose."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False))
    m[0] = qcompile.quantize(nn.Sequential(m[0]), "w8a16")[0]
    x = torch.randn(1, 64)
    spy = GraphSpy()
    with torch.no_grad(), spy.installed(), qcompile.collect() as report:
        out = torch.compile(m, backend="qcompile")(x)
        ref = m(x)
    assert len(report) == 1 and report.records[0].matched, str(report)  # the float mm is gone
    targets = spy.graphs[-1][0]
    assert sum(t in QC_OPS for t in targets) == 1
    assert not any(t in ATEN_MMS for t in targets)  # the float linear: mul + sum, no mm
    assert aten.sum.dim_IntList in targets
    assert rel_err(out, ref) <= 1e-5


SETTINGS = {
    "default": {},
    "max-autotune": dict(mode="max-autotune"),
    "max-autotune-no-cudagraphs": dict(mode="max-autotune-no-cudagraphs"),
    "reduce-overhead": dict(mode="reduce-overhead"),
    "coordinate-descent": dict(options={"coordinate_descent_tuning": True}),
    "no-epilogue-fusion": dict(options={"epilogue_fusion": False}),
    "cudagraphs-option": dict(options={"triton.cudagraphs": True}),
    "no-freezing": dict(options={"freezing": False}),
    "dynamic": dict(dynamic=True),
    "static": dict(dynamic=False),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("target", ["module", "function"])
def test_every_setting_takes_over_a_batch_1_step(gpu_like_decomposition, setting, target):
    model = _mlp("w4a16")
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    fn = model if target == "module" else (lambda t: model(t))
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(fn, backend="qcompile", **SETTINGS[setting])(x)
        ref = model(x)
    assert len(report.matched) == len(report) == 2, str(report)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


# Settings users make on the config modules themselves before compiling, not through
# torch.compile's arguments. Under Inductor's freezing (and Dynamo's prepare_freezing) Dynamo
# installs parameters and buffers on the graph module instead of passing them as inputs, and
# AOTAutograd lifts them in front of the inputs: before the backend counted those, the pass
# saw more graph inputs than example inputs, read no weight and took nothing over.
AMBIENT = {  # (Inductor config, Dynamo config, torch.compile arguments)
    "inductor-freezing": ({"freezing": True}, {}, {}),
    "dynamo-prepare-freezing": ({}, {"prepare_freezing": True}, {}),
    "dynamo-no-inlined-modules": ({}, {"inline_inbuilt_nn_modules": False}, {}),
    "inductor-freezing-max-autotune": ({"freezing": True, "max_autotune": True}, {}, {}),
    "inductor-freezing-option-off": ({"freezing": True}, {}, {"options": {"freezing": False}}),
}


@pytest.mark.parametrize("setting", list(AMBIENT))
@pytest.mark.parametrize("target", ["module", "function"])
@pytest.mark.parametrize("method", ["w4a16", "w8a8", "nf4"])
def test_every_ambient_setting_takes_over(gpu_like_decomposition, setting, target, method):
    inductor, dynamo, kwargs = AMBIENT[setting]
    model = _mlp(method, **({"block_size": 64} if method == "nf4" else {}))
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    fn = model if target == "module" else (lambda t: model(t))
    with torch.no_grad(), torch._inductor.config.patch(inductor), \
            torch._dynamo.config.patch(dynamo), qcompile.collect() as report:
        torch._dynamo.reset()
        out = torch.compile(fn, backend="qcompile", **kwargs)(x)
        ref = model(x)
    assert len(report.matched) == len(report) == 2, str(report)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


def test_decode_steps_under_inductor_freezing(gpu_like_decomposition):
    """A decode loop with its KV cache (buffers the graph writes) under the freezing config:
    every linear taken over, two steps with eager's logits, the cache written by both."""
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIGS["tiny"]).to(torch.bfloat16), "w4a16", group_size=64)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (2, 1))
    with torch.no_grad(), torch._inductor.config.patch(freezing=True), qcompile.collect() as report:
        model.setup_caches(2, 16)
        ref = [model(tokens, torch.tensor([p])) for p in (3, 4)]
        model.setup_caches(2, 16)
        torch._dynamo.reset()
        step = torch.compile(model, backend="qcompile")
        out = [step(tokens, torch.tensor([p])) for p in (3, 4)]
    assert report.matched and len(report.matched) == len(report), str(report)
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= 2e-2


def test_a_function_reading_global_quantized_tensors():
    """A compiled function whose int4 weight and scales are tensors global to it (not module
    parameters): Dynamo passes them as ordinary inputs, so the pass cannot read them and the
    report says how to make it; marked static, they are taken over with eager's numbers."""
    torch.manual_seed(0)
    q = torch.randint(-8, 8, (64, 128), dtype=torch.int8)
    s = torch.rand(64, 2, dtype=torch.bfloat16) * 0.01 + 0.01

    def f(x):
        w = (q.to(torch.bfloat16).reshape(64, 2, 64) * s[..., None]).reshape(64, 128)
        return x @ w.t()

    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(f, backend="qcompile")(x)
    assert len(report) == 1 and not report.records[0].matched
    assert "not a parameter or buffer" in report.records[0].reason
    assert "torch._dynamo.mark_static_address" in report.records[0].reason
    # and the no-takeover warning says it, as for weights held in modules
    assert len(report.notes) == 1 and "not a parameter or buffer" in report.notes[0]
    assert rel_err(out, f(x)) == 0
    torch._dynamo.mark_static_address(q)
    torch._dynamo.mark_static_address(s)
    torch._dynamo.reset()
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(f, backend="qcompile")(x)
    assert len(report.matched) == len(report) == 1, str(report)
    assert rel_err(out, f(x)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_formats_under_grad_modes(gpu_like_decomposition, method, grad_mode, dtype):
    model = _mlp(method, dtype=dtype)
    x = torch.randn(1, 128, dtype=dtype)
    ctx = torch.no_grad() if grad_mode == "no_grad" else torch.inference_mode()
    with ctx, qcompile.collect() as report:
        out = torch.compile(lambda t: model(t), backend="qcompile", fullgraph=True)(x)
        ref = model(x)
    assert len(report.matched) == len(report) == 2, str(report)
    assert rel_err(out, ref) <= TOL[dtype]


def test_cpp_wrapper(gpu_like_decomposition):
    model = _mlp("w8a16", dtype=torch.float32)
    x = torch.randn(1, 128)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile", options={"cpp_wrapper": True})(x)
        ref = model(x)
    assert len(report.matched) == 2, str(report)
    assert rel_err(out, ref) <= TOL[torch.float32]


class EinsumLinear(nn.Module):
    """A quantized layer's dequantized weight applied with ``torch.einsum`` instead of
    F.linear (einsum lowers to a bmm of batch 1 over the weight unsqueezed and permuted)."""

    def __init__(self, layer: nn.Module, equation: str):
        super().__init__()
        self.layer, self.equation = layer, equation

    def forward(self, x):
        if hasattr(self.layer, "dequantized_weight"):
            w = self.layer.dequantized_weight(x.dtype)
        else:  # W8A16: q * s[:, None]
            w = self.layer.qweight.to(x.dtype) * self.layer.scales[:, None]
        return torch.einsum(self.equation, x, w)


@pytest.mark.parametrize("method,equation,shape", [("w8a16", "mk,nk->mn", (5, 128)),
                                                   ("w4a16", "btk,nk->btn", (2, 3, 128)),
                                                   ("nf4", "...k,nk->...n", (1, 1, 128))])
def test_einsum_spellings_of_a_linear_are_taken_over(method, equation, shape):
    torch.manual_seed(0)
    kw = {"block_size": 64} if method == "nf4" else {"group_size": 64} if method == "w4a16" else {}
    layer = qcompile.quantize(nn.Sequential(nn.Linear(128, 64, bias=False)).to(torch.bfloat16),
                              method, **kw)[0]
    model = EinsumLinear(layer, equation)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
        ref = model(x)
    assert len(report.matched) == len(report) == 1, str(report)
    assert out.shape == ref.shape and rel_err(out, ref) <= TOL[torch.bfloat16]


class LookupTableLinear(nn.Module):
    """A 4-bit lookup-table weight (NF4-like): ``table[codes] * absmax`` per 64-block; with
    ``entries=32`` a 5-bit table, which the pass does not read (at most 16 values)."""

    def __init__(self, n: int = 64, k: int = 128, entries: int = 16):
        super().__init__()
        self.register_buffer("codes", torch.randint(0, entries, (n, k), dtype=torch.uint8))
        self.register_buffer("table", torch.linspace(-1, 1, entries))
        self.register_buffer("absmax", torch.rand(n, k // 64) + 0.5)

    def forward(self, x):
        n, k = self.codes.shape
        w = self.table[self.codes.long()].reshape(n, k // 64, 64) * self.absmax[..., None]
        return x @ w.reshape(n, k).t()


def test_a_lookup_table_weight_is_taken_over():
    torch.manual_seed(0)
    model = LookupTableLinear()
    x = torch.randn(3, 128)
    report = qcompile.explain(model, x)
    assert len(report.matched) == 1 and not report.notes, str(report)
    assert report.records[0].format == "w4a16 lut16 b64"
    with torch.no_grad():
        assert rel_err(torch.compile(model, backend="qcompile")(x), model(x)) <= 1e-6


def test_a_graph_with_integer_weights_and_no_takeover_warns_once(caplog):
    torch.manual_seed(0)
    model = LookupTableLinear(entries=32)
    x = torch.randn(3, 128)
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        report = qcompile.explain(model, x)
    warnings = [r for r in caplog.records if r.name == "qcompile" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "read integer weights but none was rewritten" in warnings[0].getMessage()
    assert "lookup table of 32 values" in warnings[0].getMessage()
    assert len(report.notes) == 1 and "warning: " in str(report)
    assert not report.matched and "lookup table" in report.records[0].reason
    with torch.no_grad():
        assert rel_err(torch.compile(model, backend="qcompile")(x), model(x)) <= 1e-5


class PositionIds(nn.Module):
    """A float model with an integer buffer (position ids, as many transformers models
    register) that reaches matmuls through the activation, not a weight."""

    def __init__(self):
        super().__init__()
        self.register_buffer("position_ids", torch.arange(16).expand(1, -1))
        self.pos = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x + self.pos(self.position_ids[:, : x.shape[1]]))


def test_no_warning_when_taken_over_or_nothing_quantized(caplog):
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        report = qcompile.explain(_mlp("w8a16", dtype=torch.float32), torch.randn(2, 128))
        plain = qcompile.explain(nn.Linear(8, 8), torch.randn(2, 8))
        ids = qcompile.explain(PositionIds(), torch.randn(1, 16, 8))
    assert report.matched and not report.notes and not plain.notes and not ids.notes
    assert not [r for r in caplog.records if r.name == "qcompile" and r.levelno >= logging.WARNING]


def test_a_failure_while_reading_leaves_the_matmul_alone(monkeypatch):
    from qcompile.lowering import weight_only

    def broken(*args, **kwargs):
        raise IndexError("index 7 is out of bounds")
    monkeypatch.setattr(weight_only, "_probe", broken)
    model = _mlp("w4a16", dtype=torch.float32)
    x = torch.randn(4, 128)
    report = qcompile.explain(model, x)
    assert not report.matched and len(report) == 2
    assert all("IndexError: index 7 is out of bounds" in r.reason for r in report.records)
    with torch.no_grad():
        assert rel_err(torch.compile(model, backend="qcompile")(x), model(x)) <= 1e-5


def test_a_failure_while_rewriting_leaves_the_matmul_alone(monkeypatch):
    from qcompile.lowering import rewrite

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")
    monkeypatch.setattr(rewrite.kernels, "prepare_mixed_gemm", broken)
    model = _mlp("w8a16", dtype=torch.float32)
    x = torch.randn(4, 128)
    spy = GraphSpy()
    with torch.no_grad(), spy.installed(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert not report.matched and len(report) == 2
    assert all("rewrite failed (RuntimeError: no kernel for this)" in r.reason
               for r in report.records)
    assert not any(t in QC_OPS for t in spy.graphs[-1][0])
    assert rel_err(out, model(x)) <= 1e-5


# --- int32 matmul of int8 values: W8A8 as CPU code writes it -------------------------------

class Int32MatmulW8A8(nn.Module):
    """Per-token dynamic int8 activations times an int8 [K, N] weight, multiplied in int32."""

    def __init__(self, k: int = 128, n: int = 96, dtype=torch.float32, widen_weight: bool = True,
                 activation_int8: bool = True):
        super().__init__()
        w = torch.randn(n, k)
        ws = w.abs().amax(1) / 127
        self.register_buffer("wq", (w / ws[:, None]).round().clamp(-127, 127).to(torch.int8).t()
                             .contiguous())
        self.register_buffer("ws", ws.to(torch.float32))
        self.dtype, self.widen_weight, self.activation_int8 = dtype, widen_weight, activation_int8

    def forward(self, x):
        xs = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127
        xr = (x.float() / xs).round().clamp(-128, 127)
        xq = xr.to(torch.int8).to(torch.int32) if self.activation_int8 else xr.to(torch.int32)
        wq = self.wq.to(torch.int32) if self.widen_weight else self.wq
        acc = torch.matmul(xq, wq)
        return (acc.float() * xs * self.ws).to(self.dtype)

    def reference(self, x):
        xs = x.double().abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127
        xq = (x.double() / xs).round().clamp(-128, 127)
        return (xq @ self.wq.double()) * xs * self.ws.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_int32_matmul_of_int8_values_runs_as_int8_gemm(dtype, dynamic):
    torch.manual_seed(0)
    model = Int32MatmulW8A8(dtype=dtype)
    spy = GraphSpy()
    with torch.no_grad(), spy.installed(), qcompile.collect() as report:
        compiled = torch.compile(model, backend="qcompile", dynamic=dynamic)
        for shape in [(2, 5, 128), (7, 128)]:
            x = torch.randn(*shape, dtype=dtype)
            assert rel_err(compiled(x), model.reference(x)) <= TOL[dtype]
    assert report.matched and all(r.matched for r in report.records), str(report)
    assert report.records[0].format == "w8a8 int8 per-token x per-channel (int32 matmul)"
    targets = spy.graphs[-1][0]
    assert torch.ops.qcompile.int8_gemm.default in targets
    assert not any(t in ATEN_MMS for t in targets)


def test_int32_matmul_near_misses_are_left_alone():
    torch.manual_seed(0)
    x = torch.randn(4, 128)
    wide = Int32MatmulW8A8(activation_int8=False)  # int32 activation: range not proven
    report = qcompile.explain(wide, x)
    assert not report.matched and "not an int8 tensor widened" in report.records[0].reason
    big = Int32MatmulW8A8()
    big.wq = big.wq.to(torch.int32) * 3  # weight values beyond int8
    report = qcompile.explain(big, x)
    assert not report.matched and "does not hold int8 values" in report.records[0].reason
    with torch.no_grad():
        assert rel_err(torch.compile(big, backend="qcompile")(x), big(x)) <= 1e-6


@pytest.mark.parametrize("method", ["w8a16", "w4a16", "nf4"])
def test_a_second_model_of_the_same_class_gets_its_own_weights(method):
    """The compiled graph holds values computed from one model's weights (repacked, folded):
    a second instance of the same class, other weights, must recompile, not reuse it."""
    x = torch.randn(3, 128)
    kwargs = {"block_size": 64} if method == "nf4" else {"group_size": 64} if method == "w4a16" \
        else {}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 64, bias=False))
        models.append(qcompile.quantize(m, method, **kwargs))
    assert rel_err(models[0](x), models[1](x)) > 0.1  # really other weights
    with torch.no_grad(), qcompile.collect() as report:
        outs = [torch.compile(m, backend="qcompile")(x) for m in models]
        refs = [m(x) for m in models]
    assert report.graphs == 2 and len(report.matched) == 4, str(report)
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) <= 1e-5
