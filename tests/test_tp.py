"""Tensor parallel (qcompile.tp) on CPU: two gloo processes, each compiling its shard.

Each rank builds the same Llama-style block (attention + SwiGLU MLP, 7 linears), shards it
with ``qcompile.tp.shard`` (q/k/v, w1/w3 column-wise; wo, w2 row-wise + functional
all_reduce) and compiles it with backend="qcompile". Checked on every rank: all 7 quantized
linears taken over, the output equal to the unsharded eager model's within TOL, and the
all_reduce still in the post-grad graph (left to Inductor). Both orders: quantize then shard,
shard then quantize; and torch's DTensor spelling (parallelize_module with
qcompile.tp's Colwise/RowwiseParallel, W8A16). The refusal of a row-wise split that cuts an int4 group needs no
processes.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, rel_err
from torch import nn

import qcompile
from qcompile import tp

WORLD = 2
QC_OPS = ("qcompile.mixed_gemm", "qcompile.mixed_gemm_gated", "qcompile.mixed_gemm_norm_out",
          "qcompile.int8_gemm", "qcompile.lut_gemm", "qcompile.lut_gemm_gated",
          "qcompile.lut_gemm_norm_out")


class Block(nn.Module):
    """Attention (heads inferred from the shapes, so a shard needs no head count) + SwiGLU."""

    def __init__(self, dim=256, hidden=512, head_dim=32):
        super().__init__()
        self.head_dim = head_dim
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, -1, self.head_dim).transpose(1, 2)
                   for lin in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.wo(a.transpose(1, 2).reshape(b, t, -1))
        return h + self.w2(F.silu(self.w1(h)) * self.w3(h))


CALIB = "calib"
# name -> (order, quantize kwargs, dtype)
CASES = {
    "q_then_s_w8a16": ("quantize_first", dict(method="w8a16"), torch.float32),
    "q_then_s_w4a16_uint8": ("quantize_first", dict(method="w4a16", group_size=64),
                             torch.bfloat16),
    "q_then_s_w4a16_awq": ("quantize_first", dict(method="w4a16", group_size=64, packing="awq"),
                           torch.float32),
    "q_then_s_w4a16_gptq": ("quantize_first",
                            dict(method="w4a16", group_size=128, packing="gptq",
                                 zero_point=False), torch.float32),
    "q_then_s_w8a8_static": ("quantize_first", dict(method="w8a8", act="static",
                                                    calibration=CALIB), torch.float32),
    # group-wise int4 quantized after the split: the same groups, the same weights
    "s_then_q_w4a16_gptq": ("shard_first", dict(method="w4a16", group_size=64, packing="gptq"),
                            torch.bfloat16),
    # NF4 with a double-quantized absmax (read back into the shards), and NF4 after the split
    "q_then_s_nf4_dq": ("quantize_first", dict(method="nf4", block_size=64, double_quant=True),
                        torch.bfloat16),
    "s_then_q_fp4": ("shard_first", dict(method="fp4", block_size=128), torch.float32),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spy():
    graphs = []

    def spy(graph):
        graphs.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    return graphs, spy


def _run_case(rank: int, name: str) -> str:
    order, kwargs, dtype = CASES[name]
    torch.manual_seed(0)
    full = Block().to(dtype)
    x = torch.randn(2, 8, 256, dtype=dtype)  # same on every rank (same seed)
    kwargs = dict(kwargs)
    if kwargs.get("calibration") == CALIB:
        kwargs["calibration"] = [torch.randn(2, 8, 256, dtype=dtype)]
    with torch.no_grad():
        if order == "quantize_first":
            qcompile.quantize(full, **kwargs)
            ref = full(x)
            model = tp.shard(copy.deepcopy(full), rank, WORLD)
        else:
            ref = qcompile.quantize(copy.deepcopy(full), **kwargs)(x)
            model = qcompile.quantize(tp.shard(copy.deepcopy(full), rank, WORLD), **kwargs)
    assert isinstance(model.w2, tp.AllReduce) and model.w1.out_features == 512 // WORLD
    torch._dynamo.reset()
    graphs, spy = _spy()
    compiled = torch.compile(model, backend="qcompile")
    with torch.no_grad(), qcompile.collect() as report, \
            torch._inductor.config.patch(post_grad_custom_post_pass=spy):
        out = compiled(x)
    assert len(report.matched) == 7, f"{name} rank {rank}:\n{report}"
    assert not report.unmatched, f"{name} rank {rank}:\n{report}"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{name} rank {rank}: rel err {err:.2e} vs the unsharded model"
    targets = [t for g in graphs for t in g]
    reduces = [t for t in targets if "all_reduce" in t]
    assert len(reduces) == 2, f"{name} rank {rank}: all_reduce ops {reduces}"
    assert sum(t.startswith(QC_OPS) for t in targets) >= 1
    return f"{name}: rank {rank} {len(report.matched)}/7 matched, rel err {err:.1e}"


def _run_dtensor(rank: int) -> str:
    """torch's parallelize_module with qcompile.tp's Colwise/RowwiseParallel on a W8A16 block:
    DTensor's redistributions (Partial -> Replicate) become the all_reduce in the graph."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    full = qcompile.quantize(Block(), "w8a16")
    x = torch.randn(2, 8, 256)
    plan = {**{n: tp.ColwiseParallel() for n in ("wq", "wk", "wv", "w1", "w3")},
            **{n: tp.RowwiseParallel() for n in ("wo", "w2")}}
    with torch.no_grad():
        ref = full(x)
        model = parallelize_module(copy.deepcopy(full), mesh, plan)
    torch._dynamo.reset()
    graphs, spy = _spy()
    with torch.no_grad(), qcompile.collect() as report, \
            torch._inductor.config.patch(post_grad_custom_post_pass=spy):
        out = torch.compile(model, backend="qcompile")(x)
    assert len(report.matched) == 7 and not report.unmatched, str(report)
    err = rel_err(out, ref)
    assert err <= TOL[torch.float32], f"dtensor rank {rank}: rel err {err:.2e}"
    reduces = [t for g in graphs for t in g if "all_reduce" in t]
    assert len(reduces) == 2, reduces
    with pytest.raises(NotImplementedError, match="Int4WeightOnlyLinear"):
        int4 = qcompile.quantize(Block(), "w4a16", group_size=64)
        parallelize_module(int4, mesh, {"w1": tp.ColwiseParallel()})
    return f"dtensor_w8a16: rank {rank} {len(report.matched)}/7 matched, rel err {err:.1e}"


def _worker(rank: int, port: int, names: list[str], outdir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        lines = [_run_case(rank, n) for n in names] + [_run_dtensor(rank)]
        with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(lines))
    finally:
        dist.destroy_process_group()


def test_sharded_block_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    names = list(CASES)
    mp.spawn(_worker, args=(_free_port(), names, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == len(names) + 1
        print("\n".join(lines))


def test_rowwise_split_cutting_a_group_is_refused():
    torch.manual_seed(0)
    m = qcompile.quantize(nn.Sequential(nn.Linear(192, 64, bias=False)), "w4a16", group_size=64)
    with pytest.raises(ValueError, match=r"layer '0'.*shard width 96.*group_size=64"):
        tp.shard(m, 0, 2, plan={"0": "rowwise"})
    # column-wise the same layer splits fine; row-wise over 3 ranks (64 columns each) too
    assert tp.shard(copy.deepcopy(m), 1, 2, plan={"0": "colwise"})[0].out_features == 32
    assert tp.shard(copy.deepcopy(m), 2, 3, plan={"0": "rowwise"})[0].linear.in_features == 64
    lut = qcompile.quantize(nn.Sequential(nn.Linear(192, 64, bias=False)), "nf4", block_size=64)
    with pytest.raises(ValueError, match=r"layer '0'.*lookup-table blocks.*block_size=64"):
        tp.shard(lut, 0, 2, plan={"0": "rowwise"})


def test_shards_add_up_to_the_layer():
    """Single process: column shards concatenate and row shards sum to the unsharded layer,
    for every format, including a bias (kept on rank 0 only when row-wise)."""
    torch.manual_seed(0)
    x = torch.randn(3, 128)
    for kw in (None, dict(method="w8a16"), dict(method="w8a16", style="post"),
               dict(method="w4a16", group_size=32), dict(method="w4a16", group_size=32,
                                                         packing="awq"),
               dict(method="w4a16", group_size=32, packing="gptq", zero_point=False),
               dict(method="w8a8", act="static", calibration=[x]),
               dict(method="nf4", block_size=64), dict(method="nf4", block_size=32,
                                                       double_quant=True),
               dict(method="fp4", block_size=64)):
        lin = nn.Sequential(nn.Linear(128, 64))
        if kw:
            qcompile.quantize(lin, **kw)
        lin = lin[0]
        with torch.no_grad():
            ref = lin(x)
            col = torch.cat([tp.shard_linear(lin, "colwise", r, 2)(x) for r in range(2)], -1)
            row = sum(tp.shard_linear(lin, "rowwise", r, 2)(x[:, r * 64:(r + 1) * 64])
                      for r in range(2))
        assert torch.equal(col, ref), kw
        assert rel_err(row, ref) < 1e-5, kw
