"""4-bit lookup-table weights (NF4, FP4, any 16-value codebook): recognition by meaning, the
``qcompile::lut_gemm`` reference, ``quantize(model, "nf4" | "fp4")``, near misses left alone,
and bitsandbytes' registered ops (the real ones when bitsandbytes is installed, else a
stand-in with the documented schema registered under a test namespace)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, rel_err
from torch import nn

import qcompile
from qcompile.kernels import ops
from qcompile.lowering import lookup_table

LUT_OP = torch.ops.qcompile.lut_gemm.default
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _run(model, x):
    torch._dynamo.reset()  # another instance of a class compiled before is compiled again
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
        ref = model(x)
    return report, out, ref


def _w64(model: nn.Module) -> list[torch.Tensor]:
    return [m.dequantized_weight(torch.float64) for m in model.modules()
            if isinstance(m, qcompile.LookupTable4bitLinear)]


def _mlp(dtype, method="nf4", **kw) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 384), nn.SiLU(), nn.Linear(384, 128, bias=False)).to(dtype)
    return qcompile.quantize(m, method, **kw)


def _float64_forward(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The MLP in float64 from its dequantized weights (the activation rounded as eager does)."""
    h = F.linear(x.double(), _w64(model)[0], model[0].bias.double())
    h = F.silu(h.to(x.dtype)).double()
    return F.linear(h, _w64(model)[1])


def test_quantize_errors_name_the_argument_given():
    """A lookup-table method's block that does not divide K is reported as block_size, the
    argument the caller passed (the affine methods' as group_size); a model with nothing left
    to quantize is refused with why."""
    with pytest.raises(ValueError, match=r"^block_size=64 does not divide in_features=96$"):
        qcompile.quantize(nn.Sequential(nn.Linear(96, 64)), "nf4", block_size=64)
    with pytest.raises(ValueError, match=r"^group_size=64 does not divide in_features=96$"):
        qcompile.quantize(nn.Sequential(nn.Linear(96, 64)), "w4a16", group_size=64)
    # nothing to quantize is an error, not a model returned unchanged
    done = qcompile.quantize(nn.Sequential(nn.Linear(128, 64)), "nf4", block_size=64)
    with pytest.raises(ValueError, match=r"already quantized \(LookupTable4bitLinear\)"):
        qcompile.quantize(done, "w8a16")
    with pytest.raises(ValueError, match="no nn.Linear layers to quantize outside skip=\\('0',\\)"):
        qcompile.quantize(nn.Sequential(nn.Linear(8, 8)), "w8a16", skip=["0"])


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
def test_quantized_model_runs_as_lut_gemm(method, dtype, block_size, double_quant):
    model = _mlp(dtype, method, block_size=block_size, double_quant=double_quant)
    x = torch.randn(2, 5, 256, dtype=dtype)
    report, out, ref = _run(model, x)
    assert len(report.matched) == len(report) == 2, str(report)
    assert {r.format for r in report.records} == {f"w4a16 {method} b{block_size}"}
    assert all(r.kernel.startswith("reference") for r in report.records)
    assert torch.equal(out, ref)  # the op's weight is the graph's, bit for bit
    assert rel_err(out, _float64_forward(model, x)) <= TOL[dtype]


def test_lut_gemm_reference_against_float64():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (48, 256), dtype=torch.uint8)
    table = lookup_table.code_table("nf4")
    scales = torch.rand(48, 4) + 0.5
    x = torch.randn(3, 256)
    w64 = table.double()[codes.long()] * scales.double().repeat_interleave(64, 1)
    w = ops.lut_dequantize(ops.pack_nk(codes, 4), table, scales, 64, "float32")
    assert torch.equal(w.double(), (table[codes.long()] * scales.repeat_interleave(64, 1)).double())
    assert rel_err(w, w64) <= 1e-7
    out = LUT_OP(x, ops.pack_nk(codes, 4), table, scales, None, 64, "float32", "nk")
    assert rel_err(out, x.double() @ w64.t()) <= 1e-6
    with pytest.raises(ValueError, match="layout"):
        LUT_OP(x, ops.pack_nk(codes, 4), table, scales, None, 64, "float32", "sm90")


def test_table_names():
    assert lookup_table.table_name(lookup_table.code_table("nf4")) == "nf4"
    assert lookup_table.table_name(lookup_table.code_table("fp4")) == "fp4"
    nf4_bf16 = lookup_table.code_table("nf4").to(torch.bfloat16)
    assert lookup_table.table_name(nf4_bf16.float(), torch.bfloat16) == "nf4"
    assert lookup_table.table_name(torch.linspace(-1, 1, 16)) == "lut16"


# --- hand-written graphs ---------------------------------------------------------------------

class HandNF4(nn.Module):
    """NF4 as a user might write it: codes two per byte along K (low nibble first), the table
    a float buffer indexed by the codes, the absmax repeated along K, ``x @ W.t()``; the table
    optionally cast to the activation type first, and any table size."""

    def __init__(self, n=64, k=256, block=64, table=None, dtype=torch.float32,
                 table_in_dtype=False, offset=0.0, per_element=False, lookup="index"):
        super().__init__()
        self.lookup = lookup
        g = torch.Generator().manual_seed(0)
        self.register_buffer("packed", torch.randint(0, 256, (n, k // 2), generator=g,
                                                     dtype=torch.uint8))
        t = lookup_table.code_table("nf4") if table is None else table
        self.register_buffer("table", t)
        shape = (n, k) if per_element else (n, k // block)
        self.register_buffer("absmax", (torch.rand(shape, generator=g) + 0.5).to(dtype))
        self.block, self.dtype, self.table_in_dtype = block, dtype, table_in_dtype
        self.offset, self.per_element = offset, per_element

    def weight(self):
        p = self.packed
        codes = torch.stack((p & 15, p >> 4), dim=-1).reshape(p.shape[0], -1)
        if self.table.numel() > 16:  # a wider code: the two nibbles of a byte pick one of 32+
            codes = (codes + 16 * (codes & 1)) % self.table.numel()
        elif self.table.numel() < 16:
            codes = codes % self.table.numel()
        t = self.table.to(self.dtype) if self.table_in_dtype else self.table
        scale = self.absmax if self.per_element else \
            self.absmax.repeat_interleave(self.block, dim=1)
        c = codes.long()
        if self.lookup == "embedding":  # F.embedding over a one-column table
            w = F.embedding(c.reshape(-1), t[:, None]).reshape(c.shape) * scale
        elif self.lookup == "index_select":
            w = torch.index_select(t, 0, c.reshape(-1)).reshape(c.shape) * scale
        elif self.lookup == "take":
            w = torch.take(t, c) * scale
        else:
            w = t[c] * scale
        return (w + self.offset).to(self.dtype)

    def forward(self, x):
        return x @ self.weight().t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("table_in_dtype", [False, True])
def test_hand_written_nf4_graph(dtype, table_in_dtype):
    model = HandNF4(dtype=dtype, table_in_dtype=table_in_dtype)
    x = torch.randn(7, 256, dtype=dtype)
    report, out, ref = _run(model, x)
    assert report.records[0].matched, str(report)
    assert report.records[0].format == "w4a16 nf4 b64"
    assert torch.equal(out, ref)
    assert rel_err(out, x.double() @ model.weight().double().t()) <= TOL[dtype]


@pytest.mark.parametrize("lookup", ["embedding", "index_select", "take"])
def test_lookup_spellings(lookup):
    """The table looked up by F.embedding (a one-column table), index_select or take."""
    model = HandNF4(dtype=torch.bfloat16, lookup=lookup)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    report, out, ref = _run(model, x)
    assert report.records[0].matched, str(report)
    assert report.records[0].format == "w4a16 nf4 b64"
    assert torch.equal(out, ref)


def test_hand_written_fp4_and_codebook_graphs():
    x = torch.randn(3, 256)
    for table, name in [(lookup_table.code_table("fp4"), "fp4"),
                        (torch.randn(16, generator=torch.Generator().manual_seed(1)), "lut16"),
                        (torch.linspace(-1, 1, 12), "lut16")]:  # a shorter table: padded
        model = HandNF4(table=table, block=128)
        report, out, ref = _run(model, x)
        assert report.records[0].matched, str(report)
        assert report.records[0].format == f"w4a16 {name} b128"
        assert torch.equal(out, ref)


class CodesFromActivation(nn.Module):
    """Codes that are not constant: picked from the activation at run time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", lookup_table.code_table("nf4"))
        self.register_buffer("absmax", torch.rand(32, 2) + 0.5)

    def forward(self, x):
        codes = (x[:1, :].abs() * 8).long().clamp(0, 15).expand(32, -1)
        w = self.table[codes] * self.absmax.repeat_interleave(64, dim=1)
        return x @ w.t()


@pytest.mark.parametrize("case, reason", [
    ("table32", "lookup table of 32 values"),
    ("offset", "offset"),
    ("per_element", "group size"),
    ("codes_from_x", "not constant"),
])
def test_near_misses_are_left_alone(case, reason):
    x = torch.randn(4, 256)
    if case == "table32":
        model = HandNF4(table=torch.linspace(-1, 1, 32))
    elif case == "offset":
        model = HandNF4(offset=0.125)
    elif case == "per_element":
        model = HandNF4(per_element=True)
    else:
        model = CodesFromActivation()
        x = torch.rand(4, 128) * 2
    report, out, ref = _run(model, x)
    assert len(report) == 1 and not report.matched, str(report)
    assert reason in report.records[0].reason, str(report)
    assert rel_err(out, ref) <= 1e-5


# --- bitsandbytes' ops -----------------------------------------------------------------------

def _documented_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' dequantize_4bit by its documented layout (the CPU reference)."""
    a = A.reshape(-1).view(torch.uint8).long()
    n = 1
    for d in shape:
        n *= d
    codes = torch.stack((a >> 4, a & 15), dim=-1).reshape(-1)[:n]
    w = lookup_table.code_table(quant_type)[codes].reshape(-1, blocksize) * absmax[:, None]
    return w.reshape(shape).to(dtype)


@torch.library.custom_op("qcompile_test::dequantize_4bit", mutates_args=())
def _standin_dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                             quant_type: str, shape: list[int],
                             dtype: torch.dtype) -> torch.Tensor:
    return _documented_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)


@_standin_dequantize_4bit.register_fake
def _(A, absmax, blocksize, quant_type, shape, dtype):
    return A.new_empty(shape, dtype=dtype)


class DequantThenLinear(nn.Module):
    """``linear(x, dequantize_4bit(A, absmax, ...).to(x.dtype))``: bitsandbytes'
    ``MatMul4Bit`` / ``F.dequantize_4bit`` spelling, through a registered op."""

    def __init__(self, op, quant_type="nf4", n=64, k=256, block=64, dtype=torch.bfloat16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.op, self.quant_type, self.shape, self.block, self.dtype = op, quant_type, [n, k], \
            block, dtype
        self.register_buffer("A", torch.randint(0, 256, (n * k // 2, 1), generator=g,
                                                dtype=torch.uint8))
        self.register_buffer("absmax", torch.rand(n * k // block, generator=g) + 0.5)

    def forward(self, x):
        w = self.op(self.A, self.absmax, self.block, self.quant_type, self.shape, torch.float32)
        return F.linear(x, w.to(x.dtype))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_standin_read_by_documented_layout(monkeypatch, quant_type):
    monkeypatch.setattr(lookup_table, "BNB_DEQUANT_OPS",
                        lookup_table.BNB_DEQUANT_OPS | {"qcompile_test::dequantize_4bit"})
    model = DequantThenLinear(torch.ops.qcompile_test.dequantize_4bit.default, quant_type)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    report, out, ref = _run(model, x)
    assert report.records[0].matched, str(report)
    assert report.records[0].format == f"w4a16 {quant_type} b64 (bitsandbytes {quant_type})"
    assert torch.equal(out, ref)


needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed "
                               "(an optional test dependency)")


def _bnb_linear4bit(quant_type, double_quant, dtype, bias=True):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=bias).to(dtype)
    m = bnb.nn.Linear4bit(256, 128, bias=bias, compute_dtype=dtype,
                          compress_statistics=double_quant, quant_type=quant_type)
    m.load_state_dict(lin.state_dict())
    m = m.to("cpu")  # quantizes the weight
    # On CPUs with AVX512-BF16 bitsandbytes repacks the weight into its own CPU layout at the
    # first eval forward (gemv_4bit, not read here): keep the documented layout.
    m.support_avx512bf16_for_cpu = False
    return m.eval()


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bitsandbytes_linear4bit_is_taken_over(quant_type, double_quant, dtype):
    import bitsandbytes.functional as bnbF

    model = _bnb_linear4bit(quant_type, double_quant, dtype)
    x = torch.randn(2, 3, 256, dtype=dtype)
    # Known limit: traced before any eager call, a bf16/fp16 Linear4bit's quant_state.absmax
    # reaches the graph as an ordinary input, not a constant, and the matmul is left alone
    # (numbers unchanged). After one eager call Dynamo treats it as the module's state.
    with torch.no_grad():
        model(x)
    report, out, ref = _run(model, x)
    assert len(report.matched) == len(report) == 1, str(report)
    assert report.records[0].format == f"w4a16 {quant_type} b64 (bitsandbytes {quant_type})"
    assert torch.equal(out, ref)
    w64 = bnbF.dequantize_4bit(model.weight.data, model.weight.quant_state).double()
    assert rel_err(out, x.double() @ w64.t() + model.bias.double()) <= TOL[dtype]


class BnbDequantThenLinear(nn.Module):
    """bitsandbytes' registered ops before a matmul, its state as buffers: the nested absmax
    through ``dequantize_blockwise`` + offset (double quant), then ``dequantize_4bit``."""

    def __init__(self, w, block, double_quant):
        import bitsandbytes.functional as bnbF

        super().__init__()
        packed, st = bnbF.quantize_4bit(w, blocksize=block, quant_type="nf4",
                                        compress_statistics=double_quant)
        self.block, self.shape, self.double_quant = block, list(st.shape), double_quant
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", st.absmax)
        if double_quant:
            self.register_buffer("absmax2", st.state2.absmax)
            self.register_buffer("code2", st.state2.code)
            self.register_buffer("offset", st.offset)

    def forward(self, x):
        bnb = torch.ops.bitsandbytes
        absmax = self.absmax
        if self.double_quant:
            absmax = bnb.dequantize_blockwise.default(self.absmax, self.absmax2, self.code2,
                                                      256, torch.float32) + self.offset
        w = bnb.dequantize_4bit.default(self.packed, absmax, self.block, "nf4", self.shape,
                                        torch.float32)
        return F.linear(x, w.to(x.dtype))


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
def test_bitsandbytes_dequantize_4bit_before_a_matmul(double_quant):
    torch.manual_seed(0)
    model = BnbDequantThenLinear(torch.randn(128, 256), 128, double_quant)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    report, out, ref = _run(model, x)
    assert report.records[0].matched, str(report)
    assert report.records[0].format == "w4a16 nf4 b128 (bitsandbytes nf4)"
    assert torch.equal(out, ref)


def _random_weight(n: int, k: int, g: int):
    """Codes, a random 16-value table and block scales of g (seed 0, then the caller's draws)."""
    torch.manual_seed(0)
    return (torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.randn(16),
            torch.rand(n, k // g) + 0.5)


@pytest.mark.parametrize("dequant_dtype", [torch.bfloat16, torch.float32])
def test_kernel_layout_round_trips_to_the_reference(dequant_dtype):
    """The CUDA kernels' operands (codes c - 8 in the sm90 int4 layout, scales [K/g, N]) hold
    the same weight: the op on them, on a CPU, gives the reference's numbers exactly."""
    from qcompile.kernels import lut_gemm

    n, k, g = 48, 256, 64
    codes, table, scales = _random_weight(n, k, g)
    x = torch.randn(5, k, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16)
    dd = ops.dtype_name(dequant_dtype)
    ref = torch.ops.qcompile.lut_gemm(x, ops.pack_nk(codes, 4), table, scales, bias, g, dd,
                                      ops.REFERENCE_LAYOUT, "")
    qweight, table_k, scales_k = lut_gemm.prepare(codes, table, scales)
    assert qweight.shape == (n, k // 2) and scales_k.shape == (k // g, n)
    got = torch.ops.qcompile.lut_gemm(x, qweight, table_k, scales_k, bias, g, dd,
                                      lut_gemm.LAYOUT, "")
    assert torch.equal(got, ref)
    back, s_back = lut_gemm._unprepare(qweight, scales_k, k)
    assert torch.equal(back, codes.long()) and torch.equal(s_back, scales)


def test_kernel_layout_fused_ops_match_the_reference_layout():
    """The fused lookup-table ops (RMSNorm staged or given, residual, gating, the next norm's
    inputs) on the kernels' operands, on a CPU, equal the same ops on the reference layout
    bit for bit (both dequantize the same weight and run ``ops.fused_linear``), and the
    fusions equal the plain op with PyTorch around it within one rounding."""
    from qcompile.kernels import lut_gemm

    n, k, g = 64, 256, 64
    codes, table, scales = _random_weight(n, k, g)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    norm = torch.rand(k, dtype=torch.bfloat16) + 0.5
    residual = torch.randn(3, n, dtype=torch.bfloat16)
    nk = (ops.pack_nk(codes, 4), table, scales)
    kern = lut_gemm.prepare(codes, table, scales)
    q = torch.ops.qcompile
    for kw in ({"norm_weight": norm, "norm_eps": 1e-5, "residual": residual},
               {"norm_ssq": ops.norm_sums(x), "norm_eps": 1e-5}):
        ref = q.lut_gemm(x, *nk, None, g, "float32", ops.REFERENCE_LAYOUT, "", **kw)
        assert torch.equal(q.lut_gemm(x, *kern, None, g, "float32", lut_gemm.LAYOUT, "", **kw),
                           ref)
        plain = ops.around_gemm(
            lambda xi: q.lut_gemm(xi, *nk, None, g, "float32", ops.REFERENCE_LAYOUT, ""), x,
            kw.get("norm_weight"), 1e-5, kw.get("residual"), kw.get("norm_ssq"))
        assert rel_err(ref, plain) <= 1e-2
    gated = ops.interleave_gate_up(codes[:32], codes[32:])
    gs = ops.interleave_gate_up(scales[:32], scales[32:])
    ref = q.lut_gemm_gated(x, ops.pack_nk(gated, 4), table, gs, None, g, "float32",
                           ops.REFERENCE_LAYOUT, "", norm, 1e-5)
    assert ref.shape == (3, 32)
    assert torch.equal(q.lut_gemm_gated(x, *lut_gemm.prepare(gated, table, gs), None, g,
                                        "float32", lut_gemm.LAYOUT, "", norm, 1e-5), ref)
    xn = ops.rms_norm(x, norm, 1e-5)
    y = F.linear(xn, ops.lut_dequantize(ops.pack_nk(gated, 4), table, gs, g, "float32").to(x.dtype))
    assert rel_err(ref, ops.gate_up(y)) <= 1e-2
    outs = q.lut_gemm_norm_out(x, *kern, None, g, "float32", lut_gemm.LAYOUT, "", residual,
                               norm[:n])
    refs = q.lut_gemm_norm_out(x, *nk, None, g, "float32", ops.REFERENCE_LAYOUT, "", residual,
                               norm[:n])
    assert all(torch.equal(a, b) for a, b in zip(outs, refs))
    assert torch.equal(refs[1], (refs[0].float() * norm[:n].float()).to(x.dtype))
    assert torch.equal(refs[2], ops.norm_sums(refs[0]))
    with pytest.raises(ValueError, match="next_norm_weight must be"):
        q.lut_gemm_norm_out(x, *nk, None, g, "float32", ops.REFERENCE_LAYOUT, "", None, norm)


def _tiny_nf4_llama_steps(dtype, spy):
    """A tiny NF4 Llama (2 layers) compiled with ``spy`` as Inductor's post-grad pass, at one
    token and at 12: yields each token count once its output matched eager's."""
    from llama_model import CONFIGS, Llama

    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"]).to(dtype)
    qcompile.quantize(model, "nf4", group_size=64)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 12))
    with torch.no_grad():
        for s in (1, 12):
            model.setup_caches(1, 32)
            torch._dynamo.reset()
            with torch._inductor.config.patch(post_grad_custom_post_pass=spy):
                out = torch.compile(model, backend="qcompile")(tokens[:, :s], torch.arange(s))
            model.setup_caches(1, 32)
            assert rel_err(out, model(tokens[:, :s], torch.arange(s))) <= TOL[dtype]
            yield s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_decode_step_norms_gating_and_skips_go_into_the_ops(dtype):
    """A tiny NF4 Llama (2 layers) at one token: the lookup-table ops take the decode step's
    fusions as the affine ones do -- q/k/v (one op) and gate/up (one gated op) read their
    RMSNorm, o and down add the skip connection and write the next norm's input, the head
    reads its norm from the last down -- so no rsqrt is left to Inductor; 12 tokens keep
    plain ops. Both match eager."""
    lut, gated_op, norm_out = (torch.ops.qcompile.lut_gemm.default,
                               torch.ops.qcompile.lut_gemm_gated.default,
                               torch.ops.qcompile.lut_gemm_norm_out.default)
    seen: list = []

    def spy(graph):
        seen.clear()
        seen.append(sum(n.target is torch.ops.aten.rsqrt.default for n in graph.nodes))
        for n in graph.nodes:
            if n.target is norm_out:
                seen.append(("norm_out", False))
            elif n.target in (lut, gated_op):  # norm_weight at 9; norm_ssq at 11 / 12
                args = list(n.args) + [None] * 4
                given = args[11 if n.target is gated_op else 12] is not None
                seen.append(("gated" if n.target is gated_op else "lut",
                             "staged" if args[9] is not None else "given" if given else False))

    for s in _tiny_nf4_llama_steps(dtype, spy):
        rsqrt, ops_seen = seen[0], seen[1:]
        if s == 1:
            layer = [("norm_out", False), ("gated", "given"), ("norm_out", False)]
            assert ops_seen == ([("lut", "staged")] + layer + [("lut", "given")] + layer
                                + [("lut", "given")]), ops_seen
            assert rsqrt == 0
            kernels_col = [r.kernel for r in qcompile.last_report().records]
            assert sum("silu(gate) * up in the op" in c for c in kernels_col) == 4
            assert sum("+ residual in the op" in c for c in kernels_col) == 4
        else:
            assert ops_seen == [("lut", False)] * 9 and rsqrt == 2 * 2 + 1, ops_seen


def test_kernel_layout_bytes_are_fragment_pairs():
    """Layout sm90_lut_pairs: each byte holds the two codes of one MMA fragment register, two
    consecutive K of one row, the even K in the low nibble (the kernel indexes its table of
    value pairs with the byte as it is). Codes (k % 2) * 8 + n % 8 make that visible: stored
    as c - 8, a byte's high nibble is its low nibble ^ 8 exactly when both come from one row
    and the low one has the even K."""
    from qcompile.kernels import lut_gemm
    from qcompile.kernels.mixed_gemm import reorder_weight

    n, k = 64, 256
    kk = torch.arange(k)[None, :]
    nn_ = torch.arange(n)[:, None]
    codes = ((kk % 2) * 8 + nn_ % 8).to(torch.uint8)
    qweight, _, _ = lut_gemm.prepare(codes, torch.randn(16), torch.rand(n, k // 64))
    b = qweight.reshape(-1).to(torch.int16)
    assert torch.equal(b >> 4, (b & 0xF) ^ 8)
    # not so in the int4 layout it regroups (a byte there holds two registers' codes)
    signed = (codes.to(torch.int16) - 8).to(torch.int8)
    plain = reorder_weight(signed, 4).reshape(-1).to(torch.int16)
    assert not torch.equal(plain >> 4, (plain & 0xF) ^ 8)
    w = torch.randint(0, 256, (64, 128), dtype=torch.uint8)
    assert torch.equal(lut_gemm.unpair_bytes(lut_gemm.pair_bytes(w)), w)


def test_kernel_layout_refuses_what_the_kernels_do_not_take():
    from qcompile.kernels import lut_gemm

    from qcompile import kernels

    assert kernels.LUT_LAYOUT == lut_gemm.LAYOUT  # the dispatcher's name for the layout
    assert lut_gemm.fits(4096, 4096, 64) and lut_gemm.fits(4096, 14336, 128)
    assert not lut_gemm.fits(4096, 4096, 32)      # blocks below a 64-deep chunk
    assert not lut_gemm.fits(4096, 4096, 192)     # not 64 x 2^i
    assert not lut_gemm.fits(4104, 4096, 64)      # N not in 16-row tiles
    assert lut_gemm.supported(torch.device("cpu"), 64, 64, 64, torch.bfloat16) == "not a CUDA device"
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        lut_gemm.prepare(torch.full((16, 64), 16, dtype=torch.uint8), torch.zeros(16),
                         torch.ones(16, 1))
    with pytest.raises(ValueError, match="reads layout 'nk', got 'tiled'"):
        torch.ops.qcompile.lut_gemm(torch.randn(1, 64), torch.zeros(16, 32, dtype=torch.uint8),
                                    torch.zeros(16), torch.ones(16, 1), None, 64, "float32",
                                    "tiled", "")


def test_decode_launch_rule_where_the_lookups_differ_from_affine_weights():
    from qcompile.kernels import lut_gemm
    from qcompile.kernels import mixed_gemm_decode as dec

    # 16 tokens on wide layers: 64-row CTAs (x read half as often); not where they leave SMs idle
    assert lut_gemm.decode_choice(16, 14336, 4096) == dec.DecodeChoice(16, 64, 8)
    assert lut_gemm.decode_choice(9, 28672, 4096) == dec.DecodeChoice(16, 64, 8)
    assert lut_gemm.decode_choice(16, 4096, 4096) == dec.heuristic(16, 4096, 4096)
    assert lut_gemm.decode_choice(16, 14336, 4096, sm_count=256) == dec.heuristic(16, 14336, 4096, 256)
    # 32-token tiles with several waves of CTAs: 4 warps; beyond 32 tokens, CTAs of 32
    assert lut_gemm.decode_choice(64, 14336, 4096) == dec.DecodeChoice(32, 32, 4)
    assert lut_gemm.decode_choice(32, 4096, 4096) == dec.heuristic(32, 4096, 4096)
    # one to eight tokens: the affine rule without staged scales
    for n in (4096, 6144, 14336, 28672):
        assert lut_gemm.decode_choice(1, n, 4096) == dec.heuristic(1, n, 4096)
    for m in (1, 8, 9, 16, 17, 32, 64):
        for n, k in ((4096, 4096), (14336, 4096), (1024, 4096), (48, 64)):
            c = lut_gemm.decode_choice(m, n, k)
            assert c.valid() and n % c.rows == 0 and not c.sz_smem, (m, n, k, c)


def test_gemm_config_names_the_table_in_the_activation_type():
    """The op's config for the lookup-table GEMM carries the table's 16-bit patterns in the
    activation type (the build's compiled-in table); anything else is refused, not guessed."""
    from qcompile.kernels import lut_gemm

    nf4 = lookup_table.code_table("nf4")
    for dtype in (torch.bfloat16, torch.float16):
        bits = lut_gemm.table_bits(nf4, dtype)
        assert torch.equal(torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(dtype).float(),
                           nf4.to(dtype).float())
        config = lut_gemm._config_of(lut_gemm._ACTS[dtype], bits)
        assert lut_gemm._parse_config(config) == (lut_gemm._ACTS[dtype], bits)
    assert lut_gemm.table_bits(nf4, torch.bfloat16)[0] == 0xBF80  # -1.0
    assert lut_gemm._parse_config("") is None
    for bad in ("gemm:bf32:" + "0" * 64, "gemm:bf16:" + "0" * 63, "table:bf16:" + "0" * 64,
                "gemm:fp16:" + "g" * 64):
        with pytest.raises(ValueError, match="lut_gemm config must be"):
            lut_gemm._parse_config(bad)
    # one library per table: the table words are part of every build's defines
    specs = lut_gemm.gemm_specs(nf4, torch.bfloat16)
    fp4_specs = lut_gemm.gemm_specs(lookup_table.code_table("fp4"), torch.bfloat16)
    assert len(specs) == len(fp4_specs) == len([c for c in lut_gemm.mg.LUT_CONFIGS if c.act == "bf16"])
    assert specs[0].defines["QC_LUT_T0"] == "0xbecabf06bf32bf80ULL"  # entries 0..3, 0 lowest
    assert {s.source for s in specs} == {"lut_gemm_sm90.cu"}
    assert not {s.describe() for s in specs} & {s.describe() for s in fp4_specs}


def _nvcc() -> str | None:
    from qcompile.kernels import build
    try:
        return build.find_nvcc()
    except build.KernelBuildError:
        return None


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (host code only, no GPU)")
def test_lut_gemm_lookups_match_table_indexing(tmp_path):
    """The GEMM's lookups (csrc/lut_lookup.cuh) compiled for the host, prmt emulated (its
    sign-replicate mode too): by byte permutes, and through the 256-pair table with a lane's
    own copy only (every other word poisoned): every code in every nibble of a word, and
    random words, give table[code] for stored nibbles code ^ 8, value j of the word in half
    j % 2 of register j // 2."""
    import ctypes
    import random
    import subprocess

    from qcompile.kernels import build

    rng = random.Random(0)
    table = [rng.randrange(1 << 16) for _ in range(16)]
    words = [sum(table[4 * w + i] << (16 * i) for i in range(4)) for w in range(4)]
    src = tmp_path / "lookup.cu"
    src.write_text('#include "lut_lookup.cuh"\n'
                   f"using T = qc_lut::Lookup<{', '.join(f'{w:#x}ULL' for w in words)}>;\n"
                   'extern "C" void lookup8(uint32_t q, uint32_t* out) {\n'
                   "  uint32_t r[4]; T::lookup8(q, r); for (int i = 0; i < 4; ++i) out[i] = r[i];\n}\n"
                   # the pair table as the GEMM's prologue lays it out: word 32 b + l = pair(b),
                   # the shared load a read of it that fails on a word of another lane's copy
                   "static uint32_t pairs[256 * 32];\n"
                   'extern "C" void lookup8_pairs(uint32_t q, uint32_t lane, uint32_t* out) {\n'
                   "  for (uint32_t w = 0; w < 256 * 32; ++w)\n"
                   "    pairs[w] = (w % 32 == lane) ? T::pair(w / 32) : 0xDEADu;\n"
                   "  uint32_t r[4];\n"
                   "  qc_lut::lookup8_pairs(q, 4 * lane, [](uint32_t a) { return pairs[a / 4]; }, r);\n"
                   "  for (int i = 0; i < 4; ++i) out[i] = r[i];\n}\n")
    lib_path = tmp_path / "lookup.so"
    subprocess.run([_nvcc(), "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC",
                    f"-I{build.csrc_dir()}", str(src), "-o", str(lib_path)], check=True,
                   capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.lookup8.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    out = (ctypes.c_uint32 * 4)()
    lib.lookup8_pairs.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    words_of_codes = [[c] * 8 for c in range(16)] + [[(c + j) % 16 for j in range(8)] for c in range(16)]
    words_of_codes += [[rng.randrange(16) for _ in range(8)] for _ in range(500)]
    for i, codes in enumerate(words_of_codes):
        lib.lookup8(sum((c ^ 8) << (4 * j) for j, c in enumerate(codes)), out)
        assert [v for w in out for v in (w & 0xFFFF, w >> 16)] == [table[c] for c in codes], codes
        lane = i % 32  # each lane reads its own copy of the pair table only
        lib.lookup8_pairs(sum((c ^ 8) << (4 * j) for j, c in enumerate(codes)), lane, out)
        assert [v for w in out for v in (w & 0xFFFF, w >> 16)] == [table[c] for c in codes], (lane, codes)


def test_lut_gemm_tiles_follow_the_int4_heuristic():
    """The lookup-table GEMM's tile for each problem is the affine int4 heuristic's pick among
    its builds (the same tile as int4 in blocks of 64 wherever int4 has it 64 deep)."""
    from qcompile.kernels import lut_gemm
    from qcompile.kernels import mixed_gemm as mg

    for m in (65, 96, 128, 256, 512, 2048, 8192):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 4096), (6144, 4096)):
            lut = lut_gemm.gemm_choice(m, n, k, "bf16", 64)
            aff = mg.choose_config(m, n, k, "bf16", 4, 2, 132, 64)
            assert lut.config in mg.LUT_CONFIGS and lut.config.mode == mg.MODE_LUT
            shape = lambda c: (c.tile_m, c.tile_n, c.tile_k, c.cluster_m, c.coop)  # noqa: E731
            assert (shape(lut.config), lut.decomposition, lut.splits) == \
                (shape(aff.config), aff.decomposition, aff.splits), (m, n, k)
    # the int4 family never hands out a lookup-table build, nor the reverse
    assert all(c.mode != mg.MODE_LUT for c in mg.CONFIGS)
    with pytest.raises(ValueError, match="no sm90 mixed-GEMM choice"):
        mg.choice_from_name(mg.choice_name(lut_gemm.gemm_choice(2048, 4096, 4096, "bf16", 64)))


def test_lut_gemm_paths_off_hopper(monkeypatch):
    """Off a Hopper GPU the op runs with a GEMM config as without (here the reference on the
    CPU); a forced path must be one of run's; the report says what prefill runs."""
    from qcompile.kernels import lut_gemm

    from qcompile import kernels

    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    table, scales = lookup_table.code_table("nf4"), torch.rand(64, 2) + 0.5
    prepared = lut_gemm.prepare(codes, table, scales)
    config = lut_gemm._config_of("bf16", lut_gemm.table_bits(table, torch.bfloat16))
    x = torch.randn(100, 128, dtype=torch.bfloat16)
    ref = lut_gemm.reference_prepared(x, *prepared, None, 64, "float32")
    torch.testing.assert_close(lut_gemm.run(x, *prepared, None, 64, "float32", config=config), ref,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="path must be one of"):
        lut_gemm.run(x, *prepared, None, 64, "float32", path="cutlass")
    assert lut_gemm.gemm_supported(torch.device("cpu"), 64, 128, 64, torch.bfloat16) == "not a CUDA device"
    assert lut_gemm.path_name(16, 14336, 4096, torch.bfloat16, 64, config).startswith("decode ")
    assert lut_gemm.path_name(2048, 14336, 4096, torch.bfloat16, 64, config) == \
        "gemm bf16.w4.lut.128x256x64.coop.c2x1"
    assert lut_gemm.path_name(2048, 14336, 4096, torch.bfloat16, 64, "") == "dequantize + cublas"
    assert lut_gemm.path_name(2048, 14336, 4096, torch.float16, 64, config) == "dequantize + cublas"
    # the decode kernel up to gemm_min_m - 1 tokens where a GEMM build is named: 32 on weights
    # of at most 2^18 an SM, 16 on larger ones (its 32-token tile loses to the GEMM there)
    assert (lut_gemm.GEMM_MIN_M, lut_gemm.GEMM_WIDE_MIN_M) == (33, 17)
    shapes = ((4096, 4096), (6144, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (28672, 4096))
    assert [lut_gemm.gemm_min_m(n, k, 132) for n, k in shapes] == [33, 33, 33, 17, 17, 17]
    assert lut_gemm.gemm_min_m(4096, 8448, 132) == 33 and lut_gemm.gemm_min_m(4096, 8512, 132) == 17
    assert lut_gemm.gemm_min_m(14336, 4096, 448) == 33
    for (n, k), last_decode in (((14336, 4096), 16), ((4096, 14336), 16), ((4096, 4096), 32)):
        assert lut_gemm.path_name(last_decode, n, k, torch.bfloat16, 64, config).startswith("decode ")
        assert lut_gemm.path_name(last_decode + 1, n, k, torch.bfloat16, 64, config).startswith("gemm ")
        assert lut_gemm.path_name(last_decode + 1, n, k, torch.bfloat16, 64, "").startswith("decode ")
    assert lut_gemm.path_name(17, 14336, 4096, torch.bfloat16, 64, config, sm_count=448).startswith("decode ")
    monkeypatch.setattr(lut_gemm, "GEMM_WIDE_MIN_M", 33)
    assert lut_gemm.path_name(32, 14336, 4096, torch.bfloat16, 64, config).startswith("decode ")
    assert lut_gemm.path_name(33, 14336, 4096, torch.bfloat16, 64, config).startswith("gemm ")
    assert kernels.prepare_lut_gemm(codes, table, scales, 64, torch.bfloat16, "nf4").config == ""


def prepare_as_on_hopper(codes, table, scales, group_size, act_dtype, table_name="lut16"):
    """``kernels.prepare_lut_gemm`` as on Hopper with a GEMM build, for a CPU: the kernels'
    layout (whose op runs the reference off a GPU) and the ``gemm_scales`` operand."""
    from qcompile import kernels
    from qcompile.kernels import lut_gemm

    operands = lut_gemm.prepare(codes, table, scales)
    return kernels.PreparedGemm(operands, lut_gemm.LAYOUT, "", "stand-in",
                                {"gemm_scales": lut_gemm.gemm_scales_of(operands[2], act_dtype)})


def test_gemm_scales_operand_checked_and_ignored_by_the_reference():
    """``gemm_scales`` (the block scales in the activation type, for the Hopper GEMM) is the
    scales' copy: the op on the kernels' operands gives the same numbers with it as without
    (the reference reads ``scales``), a wrong shape is an error, and ``gemm_scales_of`` makes
    it in bf16 / fp16 only."""
    from qcompile.kernels import lut_gemm

    n, k, g = 64, 256, 64
    codes, table, scales = _random_weight(n, k, g)
    kern = lut_gemm.prepare(codes, table, scales)
    act_scales = lut_gemm.gemm_scales_of(kern[2], torch.bfloat16)
    assert act_scales.dtype == torch.bfloat16 and act_scales.shape == (k // g, n)
    assert torch.equal(act_scales, kern[2].to(torch.bfloat16))
    x = torch.randn(40, k, dtype=torch.bfloat16)
    q = torch.ops.qcompile
    plain = q.lut_gemm(x, *kern, None, g, "float32", lut_gemm.LAYOUT, "")
    assert torch.equal(q.lut_gemm(x, *kern, None, g, "float32", lut_gemm.LAYOUT, "",
                                  gemm_scales=act_scales), plain)
    with pytest.raises(ValueError, match="gemm_scales must have the scales' shape"):
        q.lut_gemm(x, *kern, None, g, "float32", lut_gemm.LAYOUT, "", gemm_scales=act_scales.t())
    with pytest.raises(ValueError, match=r"and device \(cpu\), got \(4, 64\) on meta"):
        lut_gemm.run(x, *kern, None, g, "float32", gemm_scales=act_scales.to("meta"))
    with pytest.raises(ValueError, match="bf16 and fp16"):
        lut_gemm.gemm_scales_of(kern[2], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_scales_travel_with_every_lookup_table_op(dtype, monkeypatch):
    """Where ``prepare_lut_gemm`` names a ``gemm_scales`` operand (Hopper, a GEMM build), each
    op the rewrite puts down reads it by name -- the plain op, the gated one and the one that
    writes the next norm's input (made from a plain op after the rewrite) -- as a constant in
    the activation type equal to the op's scales. Here a CPU stands in for the GPU (the kernels'
    layout runs its reference there): a tiny NF4 Llama at one token and at 12, against eager."""
    from qcompile import kernels

    monkeypatch.setattr(kernels, "prepare_lut_gemm", prepare_as_on_hopper)
    lut_ops = (torch.ops.qcompile.lut_gemm.default, torch.ops.qcompile.lut_gemm_gated.default,
               torch.ops.qcompile.lut_gemm_norm_out.default)
    seen: list = []

    def spy(graph):
        seen.clear()
        gm = graph.owning_module
        for node in graph.nodes:
            if node.target in lut_ops:
                named = node.kwargs.get("gemm_scales")
                assert named is not None and named.op == "get_attr", node.format_node()
                act_scales, scales = getattr(gm, named.target), getattr(gm, node.args[3].target)
                assert act_scales.dtype == dtype and torch.equal(act_scales, scales.to(dtype))
                seen.append(lut_ops.index(node.target))

    for s in _tiny_nf4_llama_steps(dtype, spy):
        # one token: q/k/v, then per layer o (norm_out), gate/up (gated), down (norm_out), then
        # the head; 12 tokens: the plain op at each of the 9 matmul sites
        assert seen == ([0, 2, 1, 2, 0, 2, 1, 2, 0] if s == 1 else [0] * 9), seen


@pytest.mark.parametrize("bias", [False, True])
def test_chained_lookup_table_linears_both_run_as_ops(bias):
    """A linear that reads the previous one's 2-D result reads that rewrite's op: the first
    matmul must not survive (it used to, computed by Inductor on the dequantized weight,
    while the report said both were taken over)."""
    from test_backend import ATEN_MMS, GraphSpy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256, bias=bias), nn.Linear(256, 64, bias=bias))
    model = qcompile.quantize(model.to(torch.bfloat16), "nf4", block_size=64)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    spy = GraphSpy()
    torch._dynamo.reset()
    with torch.no_grad(), spy.installed():
        out = torch.compile(model, backend="qcompile")(x)
    targets = spy.graphs[0][0]
    assert sum(t in ATEN_MMS for t in targets) == 0, targets
    assert sum(t is LUT_OP for t in targets) == 2, targets
    assert torch.equal(out, model(x))


@pytest.mark.parametrize("table", ["nf4", "fp4"])
def test_quantize_rounds_in_slices_to_the_nearest_value(table, monkeypatch):
    """from_linear rounds a slice of blocks at a time (an output head at once would need 34 GB
    of distances): the codes are those of the nearest value over the whole weight at once,
    and the weight reads back within half a table step of each block's absmax."""
    from qcompile import formats
    torch.manual_seed(3)
    lin = nn.Linear(256, 40, bias=False)
    monkeypatch.setattr(formats, "_NEAREST_CHUNK", 3 * 64 + 5)  # slices that end mid-weight
    q = formats.LookupTable4bitLinear.from_linear(lin, table, block_size=64)
    t = lookup_table.code_table(table)
    blocks = lin.weight.detach().reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    want = (blocks / absmax).unsqueeze(-1).sub(t).abs().argmin(-1).reshape(40, 256)
    c = q.qweight.reshape(-1)
    got = torch.stack((c >> 4, c & 0xF), dim=-1).reshape(40, 256).long()
    assert torch.equal(got, want)
    w = (t[got].reshape(-1, 64) * absmax).reshape(40, 256)
    gap = (t.sort().values.diff().max() / 2).item()
    assert ((w - lin.weight.detach()).abs().reshape(-1, 64) <= gap * absmax + 1e-6).all()
