"""Lookup-table (NF4, FP4, codebook) weights on CUDA: the kernels against a float64 reference
(the decode kernel up to 64 tokens; beyond, the Hopper lookup-table GEMM or dequantize +
cuBLAS), and a quantized model taken over by the backend with eager's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile
from qcompile import kernels
from qcompile.kernels import lut_gemm, ops
from qcompile.lowering import lookup_table

pytestmark = pytest.mark.gpu

# The decode kernel rounds the table to the activation type (NF4's values are not bf16
# values) and sums in fp32: errors of a bf16 weight, relative to the float64 product.
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _problem(n, k, block, table_name, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    table = (lookup_table.code_table(table_name) if table_name != "random"
             else torch.randn(16, generator=g))
    scales = torch.rand(n, k // block, generator=g) * 0.02 + 0.01
    w64 = table.double()[codes.long()] * scales.double().repeat_interleave(block, 1)
    return codes, table, scales, w64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 32, 33, 64, 300])
def test_lut_kernels_against_float64(dtype, block, m):
    n, k = 512, 1024
    codes, table, scales, w64 = _problem(n, k, block, "nf4", dtype, seed=m)
    qweight, table_k, scales_k = (t.cuda() for t in lut_gemm.prepare(codes, table, scales))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = torch.ops.qcompile.lut_gemm(x, qweight, table_k, scales_k, bias, block, "float32",
                                      lut_gemm.LAYOUT, "")
    ref = x.double() @ w64.cuda().t() + bias.double()
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel(out, ref) <= TOL[dtype], (m, _rel(out, ref))
    if m > lut_gemm.DECODE_MAX_M:
        # dequantize + cuBLAS: the reference's weight bit for bit, the same GEMM
        w = ops.lut_dequantize(ops.pack_nk(codes, 4).cuda(), table.cuda(), scales.cuda(), block,
                               "float32").to(dtype)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias), rtol=0, atol=0)
        # and the decode kernel forced past its range (CTAs of 32 tokens over the tokens)
        dec = lut_gemm.run(x, qweight, table_k, scales_k, bias, block, "float32", path="decode")
        assert _rel(dec, ref) <= TOL[dtype], (m, _rel(dec, ref))


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not HOPPER, reason="the lookup-table GEMM is built for sm_90a")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("m", [65, 300, 1000])
def test_lut_gemm_against_float64(dtype, block, m):
    """The Hopper lookup-table GEMM (NF4 compiled in) through the op, its config from
    gemm_config: past the decode kernel's range it runs (the same result as forcing it), and
    matches float64 within the decode kernel's tolerance (table and block scales in the
    activation type, their product rounded once more)."""
    n, k = 512, 1024
    codes, table, scales, w64 = _problem(n, k, block, "nf4", dtype, seed=m)
    qweight, table_k, scales_k = (t.cuda() for t in lut_gemm.prepare(codes, table, scales))
    config = lut_gemm.gemm_config(table, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = torch.ops.qcompile.lut_gemm(x, qweight, table_k, scales_k, bias, block, "float32",
                                      lut_gemm.LAYOUT, config)
    ref = x.double() @ w64.cuda().t() + bias.double()
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel(out, ref) <= TOL[dtype], (m, _rel(out, ref))
    forced = lut_gemm.run(x, qweight, table_k, scales_k, bias, block, "float32", path="gemm",
                          config=config)
    torch.testing.assert_close(out, forced, rtol=0, atol=0)
    # the scales made once in the activation type (the op's gemm_scales) are what the GEMM
    # converts otherwise: the same result bit for bit; in the other type, converted again
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    for act_scales in (lut_gemm.gemm_scales_of(scales_k, dtype),
                       lut_gemm.gemm_scales_of(scales_k, other)):
        named = torch.ops.qcompile.lut_gemm(x, qweight, table_k, scales_k, bias, block, "float32",
                                            lut_gemm.LAYOUT, config, gemm_scales=act_scales)
        torch.testing.assert_close(named, out, rtol=0, atol=0)
    dequant = lut_gemm.run(x, qweight, table_k, scales_k, bias, block, "float32",
                           path="dequant", config=config)
    assert _rel(dequant, ref) <= TOL[dtype]


@pytest.mark.skipif(not HOPPER, reason="the lookup-table GEMM is built for sm_90a")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lut_gemm_every_build_and_split(dtype):
    """Every build of the GEMM's family (tiles, schedules, cluster) data-parallel, and the
    stream-K builds split over K and under stream-K, at token counts that leave partial
    tiles, on a weight whose N is not a multiple of the 128-row tile."""
    from qcompile.kernels import mixed_gemm as mg

    n, k, block = 1040, 2048, 64
    codes, table, scales, w64 = _problem(n, k, block, "nf4", dtype)
    qweight, _, scales_k = (t.cuda() for t in lut_gemm.prepare(codes, table, scales))
    bits = lut_gemm.table_bits(table, dtype)
    lut_gemm.build_gemm(table, dtype)
    act = "bf16" if dtype == torch.bfloat16 else "fp16"
    for m in (7, 130):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.double() @ w64.cuda().t()
        for cfg in (c for c in mg.LUT_CONFIGS if c.act == act):
            choices = [mg.Choice(cfg)]
            if cfg.streamk:
                choices += [mg.Choice(cfg, mg.DECOMP_SPLIT_K, 4), mg.Choice(cfg, mg.DECOMP_STREAM_K)]
            for choice in choices:
                out = lut_gemm._run_gemm(x, qweight, scales_k, None, block, bits, choice)
                assert _rel(out, ref) <= TOL[dtype], (m, mg.choice_name(choice), _rel(out, ref))


@pytest.mark.skipif(not HOPPER, reason="the lookup-table GEMM is built for sm_90a")
def test_lut_gemm_fp4_table():
    """Another table compiled in: FP4 (its -0 entry too), bf16, one build (128x128)."""
    from qcompile.kernels import mixed_gemm as mg

    n, k, block, dtype = 256, 512, 64, torch.bfloat16
    codes, table, scales, w64 = _problem(n, k, block, "fp4", dtype)
    qweight, _, scales_k = (t.cuda() for t in lut_gemm.prepare(codes, table, scales))
    x = torch.randn(200, k, device="cuda", dtype=dtype)
    choice = mg.Choice(mg.MixedGemmConfig("bf16", 4, mg.MODE_LUT, 128, 128, streamk=False))
    out = lut_gemm._run_gemm(x, qweight, scales_k, None, block,
                             lut_gemm.table_bits(table, dtype), choice)
    assert _rel(out, x.double() @ w64.cuda().t()) <= TOL[dtype]


@pytest.mark.parametrize("pair_table", [False, True])
@pytest.mark.parametrize("table_name", ["fp4", "random"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 14336), (48, 128)])
def test_lut_decode_kernel_tables_and_shapes(table_name, shape, pair_table, monkeypatch):
    monkeypatch.setattr(lut_gemm, "PAIR_TABLE", pair_table)  # both lookups of the kernel
    n, k = shape
    dtype = torch.bfloat16
    codes, table, scales, w64 = _problem(n, k, 64 if k % 128 else 128, table_name, dtype)
    block = 64 if k % 128 else 128
    qweight, table_k, scales_k = (t.cuda() for t in lut_gemm.prepare(codes, table, scales))
    for m in (1, 5, 20):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = torch.ops.qcompile.lut_gemm(x, qweight, table_k, scales_k, None, block,
                                          "bfloat16", lut_gemm.LAYOUT, "")
        assert _rel(out, x.double() @ w64.cuda().t()) <= TOL[dtype]


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_model_is_taken_over_on_cuda(dtype, gemm, monkeypatch):
    """Through the backend, with the lookup-table GEMM off and on for NF4 (GEMM_TABLES)."""
    monkeypatch.setattr(kernels, "GEMM_TABLES", ("nf4",) if gemm else ())
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512, bias=True), nn.SiLU(),
                          nn.Linear(512, 256, bias=False)).to("cuda", dtype)
    model = qcompile.quantize(model, "nf4", block_size=64)
    for m in (1, 4, 40, 80):  # 40: past the decode kernel's 32 tokens where the GEMM runs
        x = torch.randn(m, 256, device="cuda", dtype=dtype)
        report = qcompile.explain(model, x)
        assert len(report.matched) == 2, str(report)
        on = HOPPER and gemm  # prefill by the lookup-table GEMM
        decode_max = lut_gemm.gemm_min_m(512, 256) - 1 if on else lut_gemm.DECODE_MAX_M  # small layers
        assert all(f"lookup-table decode kernel up to {decode_max} tokens" in r.kernel
                   for r in report.matched), str(report)
        assert all(("sm90 lookup-table GEMM (nf4" in r.kernel) == on for r in report.matched)
        with torch.no_grad():
            out = torch.compile(model, backend="qcompile")(x)
            ref = model(x)
        assert _rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("act_scales", [False, True])
def test_prepare_names_gemm_scales_where_the_gemm_runs(act_scales, monkeypatch):
    """prepare_lut_gemm adds the GEMM's scales in the activation type (``named``) exactly where
    it names a GEMM build (Hopper, NF4) and LUT_GEMM_ACT_SCALES is on; the compiled model's
    ops then read them at 40 tokens with the numbers of the op that converts per call."""
    monkeypatch.setattr(kernels, "LUT_GEMM_ACT_SCALES", act_scales)
    dtype, n, k, block = torch.bfloat16, 512, 1024, 64
    codes, table, scales, _ = _problem(n, k, block, "nf4", dtype)
    prep = kernels.prepare_lut_gemm(codes.cuda(), table.cuda(), scales.cuda(), block, dtype, "nf4")
    assert bool(prep.config) == HOPPER
    assert set(prep.named) == ({"gemm_scales"} if HOPPER and act_scales else set())
    if prep.named:
        assert torch.equal(prep.named["gemm_scales"], prep.tensors[2].to(dtype))
    plain = kernels.prepare_lut_gemm(codes.cuda(), table.cuda(), scales.cuda(), block, dtype, "lut16")
    assert plain.config == "" and plain.named == {}
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n, bias=True)).to("cuda", dtype)
    model = qcompile.quantize(model, "nf4", block_size=block)
    x = torch.randn(40, k, device="cuda", dtype=dtype)
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile")(x)
        monkeypatch.setattr(kernels, "LUT_GEMM_ACT_SCALES", not act_scales)
        torch._dynamo.reset()
        other = torch.compile(model, backend="qcompile")(x)
        ref = model(x)
    assert _rel(out, ref) <= TOL[dtype]
    torch.testing.assert_close(out, other, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pair_table", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 20])
@pytest.mark.parametrize("n,k", [(512, 1024), (12672, 256)])
def test_lut_decode_kernel_fusions(dtype, pair_table, m, n, k, monkeypatch):
    """Each fusion of the lookup-table decode kernel (the gated epilogue, the RMSNorm staged
    or given, the residual, the next norm's inputs) against the ops' reference on the same
    codes: the same float32 computation rounded once, so within the decode kernel's
    tolerance (the table rounded to the activation type); the norm's partial sums to fp32
    rounding. 8 and 20 tokens at K = 1024 stage too much x for the 32 KB pair table: the
    launch takes the 16-value table there. On 12672 rows (96 x 132) the launch rule's own
    shapes run: 64-row CTAs at 16 tokens, 4-warp CTAs of 32 tokens at 20 (lut_gemm.decode_choice)."""
    monkeypatch.setattr(lut_gemm, "PAIR_TABLE", pair_table)
    block = 64
    codes, table, scales, _ = _problem(n, k, block, "nf4", dtype, seed=m)
    prepared = [t.cuda() for t in lut_gemm.prepare(codes, table, scales)]
    gated_codes = ops.interleave_gate_up(codes[: n // 2], codes[n // 2:])
    gated_scales = ops.interleave_gate_up(scales[: n // 2], scales[n // 2:])
    gated = [t.cuda() for t in lut_gemm.prepare(gated_codes, table, gated_scales)]
    nk = (ops.pack_nk(codes, 4).cuda(), table.cuda(), scales.cuda())
    nk_gated = (ops.pack_nk(gated_codes, 4).cuda(), table.cuda(), gated_scales.cuda())
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    norm = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).to(dtype)
    residual = torch.randn(m, n, device="cuda", dtype=dtype, generator=g)
    next_norm = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    ssq = ops.norm_sums(x)
    common = (block, "float32")
    lut = torch.ops.qcompile

    def check(out, ref, what):
        assert out.dtype == ref.dtype and out.shape == ref.shape, what
        assert _rel(out, ref) <= TOL[dtype], (what, _rel(out, ref))

    for kw in ({"norm_weight": norm, "norm_eps": 1e-5}, {"residual": residual},
               {"norm_weight": norm, "norm_eps": 1e-5, "residual": residual},
               {"norm_ssq": ssq, "norm_eps": 1e-5}):
        check(lut.lut_gemm(x, *prepared, None, *common, lut_gemm.LAYOUT, "", **kw),
              ops.lut_gemm_reference(x, *nk, None, *common, "nk", "", **kw), sorted(kw))
    for kw in ({}, {"norm_weight": norm, "norm_eps": 1e-5}, {"norm_ssq": ssq, "norm_eps": 1e-6}):
        check(lut.lut_gemm_gated(x, *gated, None, *common, lut_gemm.LAYOUT, "", **kw),
              ops.lut_gemm_gated_reference(x, *nk_gated, None, *common, "nk", "", **kw),
              ["gated", *sorted(kw)])
    out, normed, sums = lut.lut_gemm_norm_out(x, *prepared, None, *common, lut_gemm.LAYOUT, "",
                                              residual, next_norm)
    ref = ops.lut_gemm_reference(x, *nk, None, *common, "nk", "", residual=residual)
    check(out, ref, "norm_out")
    # the epilogue's products and sums are of its own rounded out, bit for bit up to fp32 sums
    torch.testing.assert_close(normed, (out.float() * next_norm.float()).to(dtype), rtol=0,
                               atol=0)
    torch.testing.assert_close(sums, ops.norm_sums(out), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HOPPER, reason="the lookup-table GEMM is built for sm_90a")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [16, 17, 32])
def test_lut_gemm_takes_over_from_17_tokens_on_large_weights(dtype, m):
    """On a weight of more than 2^18 values an SM, with a GEMM build named, the op runs the
    decode kernel up to 16 tokens and the lookup-table GEMM from 17 (gemm_min_m): the result
    of forcing that path bit for bit, within tolerance of float64; the fused forms (norm and
    residual, gated, next norm out) run around the GEMM and match their references."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k, block = 4096, 8704, 64  # 270 K weights an SM on an H100
    if n * k <= lut_gemm.LARGE_WEIGHTS_PER_SM * sms:
        pytest.skip(f"{n}x{k} is not a large weight on {sms} SMs")
    path = "gemm" if m >= 17 else "decode"
    assert lut_gemm.gemm_min_m(n, k, sms) == 17
    codes, table, scales, w64 = _problem(n, k, block, "nf4", dtype, seed=m)
    prepared = [t.cuda() for t in lut_gemm.prepare(codes, table, scales)]
    config = lut_gemm.gemm_config(table, dtype)
    assert lut_gemm.path_name(m, n, k, dtype, block, config, sms).startswith(path + " ")
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    common = (block, "float32")
    out = torch.ops.qcompile.lut_gemm(x, *prepared, None, *common, lut_gemm.LAYOUT, config)
    forced = lut_gemm.run(x, *prepared, None, *common, path=path, config=config)
    torch.testing.assert_close(out, forced, rtol=0, atol=0)
    assert _rel(out, x.double() @ w64.cuda().t()) <= TOL[dtype]
    norm = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).to(dtype)
    residual = torch.randn(m, n, device="cuda", dtype=dtype, generator=g)
    next_norm = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    nk = (ops.pack_nk(codes, 4).cuda(), table.cuda(), scales.cuda())
    gated_codes = ops.interleave_gate_up(codes[: n // 2], codes[n // 2:])
    gated_scales = ops.interleave_gate_up(scales[: n // 2], scales[n // 2:])
    gated = [t.cuda() for t in lut_gemm.prepare(gated_codes, table, gated_scales)]
    nk_gated = (ops.pack_nk(gated_codes, 4).cuda(), table.cuda(), gated_scales.cuda())
    lut, kw = torch.ops.qcompile, {"norm_weight": norm, "norm_eps": 1e-5, "residual": residual}
    pairs = [(lut.lut_gemm(x, *prepared, None, *common, lut_gemm.LAYOUT, config, **kw),
              ops.lut_gemm_reference(x, *nk, None, *common, "nk", "", **kw)),
             (lut.lut_gemm_gated(x, *gated, None, *common, lut_gemm.LAYOUT, config),
              ops.lut_gemm_gated_reference(x, *nk_gated, None, *common, "nk", ""))]
    out, normed, sums = lut.lut_gemm_norm_out(x, *prepared, None, *common, lut_gemm.LAYOUT, config,
                                              residual, next_norm)
    pairs.append((out, ops.lut_gemm_reference(x, *nk, None, *common, "nk", "", residual=residual)))
    for i, (got, ref) in enumerate(pairs):
        assert got.dtype == ref.dtype and got.shape == ref.shape, i
        assert _rel(got, ref) <= TOL[dtype], (i, _rel(got, ref))
    torch.testing.assert_close(normed, (out.float() * next_norm.float()).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(sums, ops.norm_sums(out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_nf4_decode_step_fusions_on_cuda(dtype, batch):
    """The reference Llama in NF4, one decode step on the GPU: the norms, gating and skip
    connections go into the lookup-table ops as they do for int4 (the report's lines), every
    op runs the kernels, and the logits match eager's."""
    from llama_model import CONFIGS, Llama

    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"]).cuda().to(dtype)
    qcompile.quantize(model, "nf4", group_size=64)
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
    assert sum("silu(gate) * up in the op" in r.kernel for r in records) == 2 * 2
    assert sum("its sums from the op before" in r.kernel for r in records) == 2 * 5 + 1 - 3
    assert all("lookup-table decode kernel" in r.kernel for r in records), \
        str(qcompile.last_report())
    assert float((out - ref).norm() / ref.norm()) <= 2e-2
