"""GPTQ act-order (``desc_act``, an unsorted ``g_idx``) with backend="qcompile" (CPU, reference
kernels): the weight is recognised as W[:, perm] in a kernel group size, the op reads the
activation gathered along K (``aten.index``), numbers match a float64 reference; linears
sharing one input and one perm (q/k/v) share one launch; near misses stay with Inductor,
with the reason in the report."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, rel_err
from test_backend import ATEN_MMS, QC_OPS, GraphSpy
from torch import nn

import qcompile
from qcompile.formats import Int4WeightOnlyLinear, quantize_groupwise_int4
from llama_model import CONFIGS, Llama

INDEX = torch.ops.aten.index.Tensor
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make_mlp(dtype: torch.dtype, zero_point: bool = True) -> nn.Module:
    """Linear(256 -> 128) + ReLU + Linear(128 -> 64), GPTQ act-order g64: the columns ordered
    by their energy on calibration inputs whose columns have unequal scales."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64, bias=False)).to(dtype)
    calib = [torch.randn(16, 256) * (torch.rand(256) * 3 + 0.1)]
    return qcompile.quantize(m, "w4a16", packing="gptq", group_size=64, zero_point=zero_point,
                             act_order=True, calibration=[c.to(dtype) for c in calib])


def float64_reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP in float64 on the exact dequantized weights (GPTQ's ``scales[g_idx]``)."""
    h = x.double() @ m[0].dequantized_weight(torch.float64) + m[0].bias.double()
    return torch.relu(h) @ m[2].dequantized_weight(torch.float64)


def test_act_order_module_is_gptq_with_an_unsorted_g_idx():
    m = make_mlp(torch.float32)
    for lin in (m[0], m[2]):
        g_idx = lin.g_idx
        assert g_idx.dtype == torch.int32 and not torch.equal(g_idx, g_idx.sort().values)
        assert torch.bincount(g_idx).tolist() == [64] * (lin.in_features // 64)
    x = torch.randn(4, 256)
    with torch.no_grad():  # the module's forward is the float64 reference, rounded once
        assert rel_err(m(x), float64_reference(m, x)) <= 1e-6


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("zero_point", [True, False], ids=["zp", "sym"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_act_order_compiles_to_qcompile_ops_with_a_gather(dtype, zero_point, dynamic):
    model = make_mlp(dtype, zero_point)
    spy = GraphSpy()
    compiled = torch.compile(model, backend="qcompile", dynamic=dynamic)
    shapes = [(2, 5, 256), (3, 7, 256), (4, 3, 256)] if dynamic else [(2, 5, 256)]
    with torch.no_grad(), qcompile.collect() as report, spy.installed():
        for shape in shapes:
            x = torch.randn(*shape, dtype=dtype)
            out = compiled(x)
            assert out.shape == (*shape[:-1], 64)
            assert rel_err(out, float64_reference(model, x)) <= TOL[dtype], f"shape {shape}"
            assert rel_err(out, model(x)) <= TOL[dtype], f"shape {shape}"
    fmt = "w4a16 uint4 g64+zeros act-order" if zero_point else "w4a16 int4 g64 act-order"
    assert [(r.matched, r.format) for r in report.records] == [(True, fmt)] * 2, str(report)
    assert all("x gathered along K (act-order)" in r.kernel for r in report.records)
    assert len(spy.graphs) == 1  # one compile for every M (dynamic)
    targets, consts = spy.graphs[0]
    assert sum(t in QC_OPS for t in targets) == 2
    assert not any(t in ATEN_MMS for t in targets), targets
    assert sum(t is INDEX for t in targets) == 2  # the activation gathers
    perms = [v for k, v in consts.items() if k.startswith("_qcompile_perm")]
    assert sorted(p.numel() for p in perms) == [128, 256]
    for p in perms:
        assert torch.equal(p.sort().values, torch.arange(p.numel()))


def _llama(dtype=torch.bfloat16) -> Llama:
    """Tiny Llama, every linear GPTQ act-order g64, ordered on a 12-token prompt."""
    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"]).to(dtype)
    model.setup_caches(1, 32)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 12))
    qcompile.quantize(model, "w4a16", packing="gptq", group_size=64, act_order=True,
                      calibration=[(tokens, torch.arange(12))])
    return model


def test_decoder_qkv_share_one_perm_and_one_launch():
    """q/k/v read one input, so act-order gives them one perm: one gather and one launch with
    fuse_linears (gate/up likewise); every linear matched; numbers as eager."""
    model = _llama()
    layer = model.layers[0]
    g_idx = {name: getattr(layer.attention, name).g_idx for name in ("wq", "wk", "wv")}
    assert torch.equal(g_idx["wq"], g_idx["wk"]) and torch.equal(g_idx["wq"], g_idx["wv"])
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 6))
    with torch.no_grad():
        model.setup_caches(1, 32)
        ref = model(tokens, torch.arange(6))
        model.setup_caches(1, 32)
        torch._dynamo.reset()
        spy = GraphSpy()
        with spy.installed():
            out = torch.compile(model, backend="qcompile",
                                options={"fuse_linears": True})(tokens, torch.arange(6))
    report = qcompile.last_report()
    assert len(report.matched) == len(report) == 15, str(report)
    assert all(r.format.endswith("act-order") for r in report.records), str(report)
    targets = spy.graphs[0][0]
    # 2 layers x (q/k/v, o, gate/up, down) + the head: one gather per launch
    assert sum(t in QC_OPS for t in targets) == 9
    assert sum(t is INDEX for t in targets) >= 9
    assert not any(t in ATEN_MMS for t in targets), targets
    together = [r for r in report.records if "one launch with" in r.kernel]
    assert len(together) == 10, str(report)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


def test_decode_step_rmsnorm_in_the_op_gathers_its_weight():
    """One token: the RMSNorm before q/k/v, gate/up and the head goes into the op with its
    weight gathered like x (its mean over K does not depend on the order); no linking of the
    norm's input to the op before, which writes it ungathered."""
    model = _llama()
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 1))
    with torch.no_grad():
        model.setup_caches(1, 32)
        torch._dynamo.reset()
        spy = GraphSpy()
        with spy.installed():
            out = torch.compile(model, backend="qcompile")(tokens, torch.arange(1))
        model.setup_caches(1, 32)
        ref = model(tokens, torch.arange(1))
    records = qcompile.last_report().records
    normed = [r for r in records if "RMSNorm in the op" in r.kernel]
    assert len(normed) == 2 * (3 + 2) + 1, str(qcompile.last_report())
    assert not any("its sums from the op before" in r.kernel for r in records)
    assert torch.ops.aten.rsqrt.default not in spy.graphs[0][0]
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


class _GIdxLinear(nn.Module):
    """A GPTQ-style linear (AutoGPTQ's forward: ``scales[g_idx]``, ``zeros[g_idx]``) over
    the groups a given ``g_idx`` names, whatever their sizes."""

    def __init__(self, g_idx: torch.Tensor, n: int = 64):
        super().__init__()
        torch.manual_seed(0)
        groups = int(g_idx.max()) + 1
        self.register_buffer("q", torch.randint(0, 16, (g_idx.numel(), n), dtype=torch.int32))
        self.register_buffer("scales", torch.rand(groups, n) * 0.1 + 0.01)
        self.register_buffer("zeros", torch.randint(0, 16, (groups, n), dtype=torch.int32))
        self.register_buffer("g_idx", g_idx.to(torch.int32))

    def forward(self, x):
        w = self.scales[self.g_idx] * (self.q - self.zeros[self.g_idx]).to(x.dtype)
        return torch.matmul(x, w)


def _shuffled(sizes: list[int]) -> torch.Tensor:
    g_idx = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return g_idx[torch.randperm(g_idx.numel(), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("sizes, expected", [
    ([64, 96, 96], "w4a16 uint4 g32+zeros act-order"),  # unequal, all multiples of 32
    ([64] * 4, "w4a16 uint4 g64+zeros act-order"),
])
def test_g_idx_groups_in_multiples_of_a_kernel_group_are_matched(sizes, expected):
    model = _GIdxLinear(_shuffled(sizes))
    x = torch.randn(5, sum(sizes))
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert [(r.matched, r.format) for r in report.records] == [(True, expected)], str(report)
    ref = x.double() @ (model.scales[model.g_idx].double()
                        * (model.q - model.zeros[model.g_idx]).double())
    assert rel_err(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("sizes, reason", [
    ([64, 64, 100, 28], "4 groups of sizes 28, 64, 100, not all multiples of one of 32, 64"),
    ([40] * 8, "8 groups of sizes 40, not all multiples"),  # act-order with g = 40
])
def test_g_idx_groups_the_kernels_do_not_take_are_left_alone(sizes, reason):
    model = _GIdxLinear(_shuffled(sizes))
    x = torch.randn(5, sum(sizes))
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    assert [r.matched for r in report.records] == [False]
    assert "(act-order, g_idx)" in report.records[0].reason
    assert reason in report.records[0].reason, report.records[0].reason
    assert rel_err(out, model(x)) <= 1e-5


def test_sorted_g_idx_is_not_act_order():
    """A g_idx of runs of 64 (desc_act off) needs no gather: no perm, no act-order."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    m = Int4WeightOnlyLinear.from_linear(lin, 64, packing="gptq")
    x = torch.randn(3, 256)
    with torch.no_grad(), qcompile.collect() as report:
        out = torch.compile(m, backend="qcompile")(x)
    assert [(r.matched, r.format) for r in report.records] == [(True, "w4a16 uint4 g64+zeros")]
    assert "gathered" not in report.records[0].kernel
    assert rel_err(out, m(x)) <= 1e-5


def test_act_order_needs_gptq_packing_and_calibration():
    lin = nn.Linear(64, 64)
    with pytest.raises(ValueError, match="act_order needs"):
        qcompile.quantize(nn.Sequential(lin), "w4a16", packing="awq", group_size=32,
                          act_order=True, calibration=[torch.randn(2, 64)])
    with pytest.raises(ValueError, match="act_order needs"):
        qcompile.quantize(nn.Sequential(lin), "w4a16", packing="gptq", group_size=32,
                          act_order=True)
    q, s, z = quantize_groupwise_int4(lin.weight, 32)
    with pytest.raises(ValueError, match="g_idx needs packing='gptq'"):
        Int4WeightOnlyLinear(q, s, z, 32, packing="awq", g_idx=torch.arange(64) // 32)
