"""A decode step's RMSNorm and skip connections in the qcompile ops (CPU, reference kernels):
at decode token counts the rewrite hands the norm's input and weight to the op that reads the
normalized activation (``norm_weight``, ``norm_eps``) and the skip connection's other operand
to the op whose result it is added to (``residual``); the prompt keeps Inductor's kernels.
Weights of every width fuse by default; ``kernels.FUSE_NORM_MIN_BITS`` raises the bound."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err

import qcompile
from qcompile import kernels
from qcompile.kernels import ops
from llama_model import CONFIGS, Llama

MIXED = torch.ops.qcompile.mixed_gemm.default
GATED = torch.ops.qcompile.mixed_gemm_gated.default
NORM_OUT = torch.ops.qcompile.mixed_gemm_norm_out.default


class OpSpy:
    """The post-grad graph's qcompile ops as (kind, norm, residual): kind "mixed", "gated" or
    "norm_out" (an op whose epilogue also writes the next norm's input), norm "staged" (the op
    normalizes its input itself), "given" (x * weight and the sums of squares from the op
    before) or False; and whether any rsqrt is left (an RMSNorm Inductor still computes)."""

    def __init__(self):
        self.ops: list[tuple[str, str | bool, bool]] = []
        self.rsqrt = 0

    def __call__(self, graph):
        for n in graph.nodes:
            if n.op != "call_function":
                continue
            if n.target is torch.ops.aten.rsqrt.default:
                self.rsqrt += 1
            if n.target is NORM_OUT:
                self.ops.append(("norm_out", False, n.args[12] is not None))
            elif n.target in (MIXED, GATED):
                args = list(n.args) + [None] * 16
                ssq = args[15] if n.target is MIXED else args[14]
                norm = "staged" if args[12] is not None else "given" if ssq is not None else False
                self.ops.append(("gated" if n.target is GATED else "mixed", norm,
                                 n.target is MIXED and args[14] is not None))

    @contextlib.contextmanager
    def installed(self):
        with torch._inductor.config.patch(post_grad_custom_post_pass=self):
            yield self


def compiled_with_spy(model, *inputs):
    """(compiled result, eager result, OpSpy) of model on inputs, compiled afresh with the
    backend, without autograd."""
    with torch.no_grad():
        torch._dynamo.reset()
        spy = OpSpy()
        with spy.installed():
            out = torch.compile(model, backend="qcompile")(*inputs)
        return out, model(*inputs), spy


def _llama(method, dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"]).to(dtype)
    qcompile.quantize(model, method, group_size=64)
    return model


@pytest.mark.parametrize("method", ["w4a16", "w8a16"])
def test_decode_step_norms_and_skips_go_into_the_ops(method):
    """Tiny Llama (2 layers), one token: q/k/v, gate/up and the output head read their
    RMSNorm inside the op (no rsqrt left), o and down add the skip connection; 12 tokens
    keep every norm with Inductor. Both match eager within bf16 tolerance."""
    model = _llama(method)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 12))
    with torch.no_grad():
        for s, fused in ((1, True), (12, False)):
            model.setup_caches(1, 32)
            torch._dynamo.reset()
            spy = OpSpy()
            with spy.installed():
                out = torch.compile(model, backend="qcompile")(tokens[:, :s], torch.arange(s))
            model.setup_caches(1, 32)
            ref = model(tokens[:, :s], torch.arange(s))
            assert rel_err(out, ref) <= 2e-2
            records = qcompile.last_report().records
            normed = [r.node for r in records if "RMSNorm in the op" in r.kernel]
            skips = [r.node for r in records if "+ residual in the op" in r.kernel]
            if fused:
                # per layer: qkv (one op), o, gate/up (one gated op), down; then the head. o
                # and down add the skip and write the next norm's input; only the first
                # layer's qkv (after the embedding) normalizes its input itself
                layer = [("norm_out", False, True), ("gated", "given", False),
                         ("norm_out", False, True)]
                assert spy.ops == ([("mixed", "staged", False)] + layer
                                   + [("mixed", "given", False)] + layer
                                   + [("mixed", "given", False)]), spy.ops
                assert spy.rsqrt == 0
                assert len(normed) == 2 * (3 + 2) + 1 and len(skips) == 2 * 2
                linked = [r for r in records if "its sums from the op before" in r.kernel]
                assert len(linked) == len(normed) - 3
                assert sum("next RMSNorm's input" in r.kernel for r in records) == 2 * 2
            else:
                assert all(op == ("mixed", False, False) for op in spy.ops), spy.ops
                assert spy.rsqrt == 2 * 2 + 1
                assert normed == [] and skips == []


def test_fuse_norm_min_bits_keeps_narrower_weights_norms_with_inductor(monkeypatch):
    """With FUSE_NORM_MIN_BITS = 8 an int4 model's decode step keeps every RMSNorm (rsqrt)
    with Inductor and adds no residual to the ops; an int8 one fuses them."""
    monkeypatch.setattr(kernels, "FUSE_NORM_MIN_BITS", 8)
    for method, fused in (("w4a16", False), ("w8a16", True)):
        model = _llama(method)
        model.setup_caches(1, 16)
        tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 1))
        with torch.no_grad():
            torch._dynamo.reset()
            spy = OpSpy()
            with spy.installed():
                torch.compile(model, backend="qcompile")(tokens, torch.arange(1))
        assert (spy.rsqrt == 0) == fused, method
        assert any(norm or res for _, norm, res in spy.ops) == fused, (method, spy.ops)


def test_float32_model_norms_fuse_without_casts():
    """A float32 model's RMSNorm has no casts around it; it is found all the same, and the
    result matches eager closely (the reference computes in float32 either way)."""
    model = _llama("w4a16", torch.float32)
    model.setup_caches(1, 16)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 1))
    with torch.no_grad():
        torch._dynamo.reset()
        spy = OpSpy()
        with spy.installed():
            out = torch.compile(model, backend="qcompile")(tokens, torch.arange(1))
        model.setup_caches(1, 16)
        ref = model(tokens, torch.arange(1))
    assert spy.rsqrt == 0 and sum(bool(norm) for _, norm, _ in spy.ops) == 2 * 2 + 1
    assert rel_err(out, ref) <= 1e-4


class NormReadTwice(nn.Module):
    """An RMSNorm whose output a linear reads and the module also returns, plus a linear whose
    result is added to a tensor of another shape (broadcast): neither may be fused."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(128) + 0.5)
        self.proj = nn.Linear(128, 64, bias=False)
        self.out = nn.Linear(64, 64, bias=False)

    def forward(self, x, b):
        x32 = x.float()
        n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight
        return n, self.out(self.proj(n)) + b


def test_norm_read_elsewhere_and_broadcast_add_are_left_alone():
    torch.manual_seed(0)
    model = NormReadTwice().to(torch.bfloat16)
    qcompile.quantize(model, "w4a16", group_size=64)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    b = torch.randn(64, dtype=torch.bfloat16)  # [N] against the result's [1, N]
    (n, y), (n_ref, y_ref), spy = compiled_with_spy(model, x, b)
    assert spy.ops == [("mixed", False, False)] * 2 and spy.rsqrt == 1
    assert rel_err(y, y_ref) <= 2e-2 and rel_err(n, n_ref) <= 1e-2


class GroupedNormLinear(nn.Module):
    """An RMSNorm over groups of the activation (Mamba2's gated norm with several groups, a
    per-head norm): the norm's rows are K / groups wide, the linear's K wide."""

    def __init__(self, k=256, groups=4):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.rand(k // groups) + 0.5)
        self.proj = nn.Linear(k, 128, bias=False)

    def forward(self, x):
        b, t, k = x.shape
        h = x.view(b, t, self.groups, k // self.groups).float()
        n = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight
        return self.proj(n.view(b, t, k))


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "nf4"])
def test_a_norm_over_groups_of_the_rows_stays_with_inductor(method):
    """The op's in-kernel norm is over the whole row: a norm over groups of it (views between
    it and the matmul) is left to Inductor, the matmul still taken over, eager's numbers (it
    was handed to the op with its [K / groups] weight, which raised at the first call)."""
    torch.manual_seed(0)
    kw = {"block_size": 64} if method == "nf4" else {"group_size": 64}
    model = qcompile.quantize(GroupedNormLinear().to(torch.bfloat16), method, **kw)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    with qcompile.collect() as report:
        out, ref, spy = compiled_with_spy(model, x)
    assert len(report.matched) == len(report) == 1, str(report)
    assert "RMSNorm" not in report.records[0].kernel
    assert spy.rsqrt == 1
    assert rel_err(out, ref) <= 2e-2


def test_op_reference_with_norm_and_residual():
    """The op's meaning: linear(rms_norm(x)) + residual, computed in float32, rounded once;
    bad norm / residual shapes are ValueErrors."""
    torch.manual_seed(0)
    n, k, group = 96, 256, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.int16)
    scales = torch.rand(n, k // group) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (n, k // group)).float()
    x = (torch.randn(3, k) * 4).to(torch.bfloat16)
    weight = (torch.rand(k) + 0.5).to(torch.bfloat16)
    residual = torch.randn(3, n).to(torch.bfloat16)
    args = (ops.pack_nk(q, 4), scales, zeros, None, 4, False, group, "sub", "float32", "nk")
    w = ops.dequantize(*args[:3], 4, False, group, "sub", torch.float64)
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    ref = normed @ w.t() + residual.double()
    out = torch.ops.qcompile.mixed_gemm(x, *args, "", weight, 1e-5, residual)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 1e-2
    gated = torch.ops.qcompile.mixed_gemm_gated(x, *args, "", weight, 1e-5)
    g = ops.gate_up((normed @ w.t()).to(torch.bfloat16))
    assert rel_err(gated, g) <= 2e-2
    with pytest.raises(ValueError, match="norm_weight"):
        torch.ops.qcompile.mixed_gemm(x, *args, "", weight[:10], 1e-5)
    with pytest.raises(ValueError, match="residual"):
        torch.ops.qcompile.mixed_gemm(x, *args, "", None, 0.0, residual[:, :5])
    plain = torch.ops.qcompile.mixed_gemm(x, *args)
    assert rel_err(plain, xd @ w.t()) <= 1e-2


def test_op_reference_norm_out_and_given_sums():
    """mixed_gemm_norm_out returns (out, out * next weight, sums of out^2 over 16-feature
    tiles), and mixed_gemm / mixed_gemm_gated reading those (norm_ssq) compute
    linear(rms_norm(out)) as if they had normalized out themselves; bad sums are ValueErrors."""
    torch.manual_seed(0)
    n, k, group = 256, 256, 64  # the first op's N is the second's K
    q = torch.randint(0, 16, (n, k), dtype=torch.int16)
    scales = torch.rand(n, k // group) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (n, k // group)).float()
    args = (ops.pack_nk(q, 4), scales, zeros, None, 4, False, group, "sub", "float32", "nk")
    w = ops.dequantize(*args[:3], 4, False, group, "sub", torch.float64)
    x = torch.randn(3, k).to(torch.bfloat16)
    residual = (torch.randn(3, n) * 4).to(torch.bfloat16)
    weight = (torch.rand(n) + 0.5).to(torch.bfloat16)
    out, normed, sums = torch.ops.qcompile.mixed_gemm_norm_out(x, *args, "", residual, weight)
    assert torch.equal(out, torch.ops.qcompile.mixed_gemm(x, *args, "", None, 0.0, residual))
    assert torch.equal(normed, (out.float() * weight.float()).to(torch.bfloat16))
    assert sums.dtype == torch.float32 and sums.shape == (3, n // 16)
    torch.testing.assert_close(sums.sum(-1), out.float().pow(2).sum(-1))
    od = out.double()
    ref = (od * torch.rsqrt(od.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()) @ w.t()
    y = torch.ops.qcompile.mixed_gemm(normed, *args, "", None, 1e-5, None, sums)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) <= 1e-2
    gated = torch.ops.qcompile.mixed_gemm_gated(normed, *args, "", None, 1e-5, sums)
    assert rel_err(gated, ops.gate_up(ref.to(torch.bfloat16))) <= 2e-2
    with pytest.raises(ValueError, match="norm_ssq"):
        torch.ops.qcompile.mixed_gemm(normed, *args, "", None, 1e-5, None, sums[:, :3])
    with pytest.raises(ValueError, match="norm_ssq"):
        torch.ops.qcompile.mixed_gemm(normed, *args, "", weight, 1e-5, None, sums)
    with pytest.raises(ValueError, match="next_norm_weight"):
        torch.ops.qcompile.mixed_gemm_norm_out(x, *args, "", residual, weight[:32])


def test_dispatcher_fallback_around_the_plain_op():
    """Where no kernel takes a fusion (here: the reference layout, which no CUDA family reads),
    the ops' CUDA dispatchers run it as PyTorch ops around the plain op (``ops.around_gemm``):
    the same results as the references within bf16 rounding, the same errors."""
    from qcompile import kernels

    torch.manual_seed(0)
    n, k, group = 256, 256, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.int16)
    scales = torch.rand(n, k // group) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (n, k // group)).float()
    args = (ops.pack_nk(q, 4), scales, zeros, None, 4, False, group, "sub", "float32", "nk")
    x = (torch.randn(3, k) * 4).to(torch.bfloat16)
    norm = (torch.rand(k) + 0.5).to(torch.bfloat16)
    residual = torch.randn(3, n).to(torch.bfloat16)
    nxt = (torch.rand(n) + 0.5).to(torch.bfloat16)
    out = kernels._mixed_gemm_cuda(x, *args, "", norm, 1e-5, residual)
    assert rel_err(out, ops.mixed_gemm_reference(x, *args, "", norm, 1e-5, residual)) <= 1e-2
    o, normed, sums = kernels._mixed_gemm_norm_out_cuda(x, *args, "", residual, nxt)
    ro, rnormed, rsums = ops.mixed_gemm_norm_out_reference(x, *args, "", residual, nxt)
    assert torch.equal(o, kernels._mixed_gemm_cuda(x, *args, "", None, 0.0, residual))
    assert rel_err(o, ro) <= 1e-2 and rel_err(normed, rnormed) <= 1e-2
    assert sums.dtype == torch.float32 and rel_err(sums, rsums) <= 2e-2
    y = kernels._mixed_gemm_cuda(normed, *args, "", None, 1e-5, None, sums)
    assert rel_err(y, ops.mixed_gemm_reference(normed, *args, "", None, 1e-5, None, sums)) <= 1e-2
    gated = kernels._mixed_gemm_gated_cuda(normed, *args, "", None, 1e-5, sums)
    assert rel_err(gated, ops.mixed_gemm_gated_reference(normed, *args, "", None, 1e-5, sums)) \
        <= 2e-2
    with pytest.raises(ValueError, match="next_norm_weight"):
        kernels._mixed_gemm_norm_out_cuda(x, *args, "", residual, nxt[:32])
    with pytest.raises(ValueError, match="norm_ssq"):
        kernels._mixed_gemm_cuda(normed, *args, "", None, 1e-5, None, sums[:, :3])


class Int8PostScaleSkip(nn.Module):
    """gpt-fast's int8 linear (``linear(x, q.to(dtype)) * s``) inside a skip connection."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("q", torch.randint(-127, 128, (128, 128), generator=g,
                                                dtype=torch.int8))
        self.register_buffer("s", (torch.rand(128, generator=g) * 0.01 + 0.001).to(torch.bfloat16))

    def forward(self, x):
        return x + F.linear(x, self.q.to(x.dtype)) * self.s


def test_skip_connection_after_a_post_scale():
    """The post-scale folds into the scales and the add into the op: one op, no add left."""
    model = Int8PostScaleSkip()
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    out, ref, spy = compiled_with_spy(model, x)
    assert spy.ops == [("mixed", False, True)]
    assert [r.kernel.endswith("+ residual in the op") for r in qcompile.last_report().records] == [True]
    assert rel_err(out, ref) <= 2e-2


class WideNormLinear(nn.Module):
    """An RMSNorm over K = 8192 read by one linear: at 4 tokens the decode kernel could not
    stage x * norm in shared memory (4 x 8192 x 2 bytes), at 1 token it can."""

    def __init__(self, k: int = 8192):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(k) + 0.5)
        self.proj = nn.Linear(k, 64, bias=False)

    def forward(self, x):
        x32 = x.float()
        n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight
        return self.proj(n)


@pytest.mark.parametrize("tokens,fused", [(1, True), (4, False)])
def test_norm_fuses_only_where_the_decode_launch_can_stage_it(tokens, fused):
    torch.manual_seed(0)
    model = WideNormLinear().to(torch.bfloat16)
    qcompile.quantize(model, "w4a16", group_size=128)
    x = torch.randn(tokens, 8192, dtype=torch.bfloat16)
    out, ref, spy = compiled_with_spy(model, x)
    assert spy.ops == [("mixed", "staged" if fused else False, False)]
    assert spy.rsqrt == (0 if fused else 1)
    assert rel_err(out, ref) <= 2e-2


class WideSkipNorm(nn.Module):
    """A skip connection whose sum (K = 8192) an RMSNorm reads before a linear: too wide for
    the decode kernel to stage 4 tokens, but the linear before it can write the norm's input."""

    def __init__(self, k: int = 8192):
        super().__init__()
        self.inp = nn.Linear(256, k, bias=False)
        self.weight = nn.Parameter(torch.rand(k) + 0.5)
        self.proj = nn.Linear(k, 64, bias=False)

    def forward(self, x, r):
        h = r + self.inp(x)
        h32 = h.float()
        n = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * self.weight
        return self.proj(n)


def test_a_norm_after_an_op_links_where_staging_would_not_fit():
    torch.manual_seed(0)
    model = WideSkipNorm().to(torch.bfloat16)
    qcompile.quantize(model, "w8a16")
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    r = torch.randn(4, 8192, dtype=torch.bfloat16)
    out, ref, spy = compiled_with_spy(model, x, r)
    assert spy.ops == [("norm_out", False, True), ("mixed", "given", False)], spy.ops
    assert spy.rsqrt == 0
    assert rel_err(out, ref) <= 2e-2


class HFStyleHead(nn.Module):
    """transformers' LlamaRMSNorm (``weight * hidden.to(dtype)``) after a skip connection,
    then its ``lm_head(hidden[:, -0:, :])``: the whole-tensor slice (an alias in the graph)
    must not hide the norm from the head."""

    def __init__(self, k: int = 128):
        super().__init__()
        self.down = nn.Linear(256, k, bias=False)
        self.weight = nn.Parameter(torch.rand(k) + 0.5)
        self.head = nn.Linear(k, 96, bias=False)

    def forward(self, x, r):
        h = r + self.down(x)
        h32 = h.to(torch.float32)
        variance = h32.pow(2).mean(-1, keepdim=True)
        normed = self.weight * (h32 * torch.rsqrt(variance + 1e-5)).to(h.dtype)
        return self.head(normed[:, -0:, :])


def test_transformers_style_norm_before_a_sliced_head():
    torch.manual_seed(0)
    model = HFStyleHead().to(torch.bfloat16)
    qcompile.quantize(model, "w8a16")
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    r = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    out, ref, spy = compiled_with_spy(model, x, r)
    assert spy.ops == [("norm_out", False, True), ("mixed", "given", False)], spy.ops
    assert spy.rsqrt == 0
    assert rel_err(out, ref) <= 2e-2
