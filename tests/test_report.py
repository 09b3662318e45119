"""The match report and pattern-debug logging: near misses carry the right reason."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile

torch.manual_seed(0)


class GroupDequantLinear(nn.Module):
    """Hand-written group-wise dequant with an arbitrary group size."""

    def __init__(self, n=32, k=96, group=24):
        super().__init__()
        self.group = group
        self.register_buffer("q", torch.randint(0, 16, (n, k), dtype=torch.uint8))
        self.register_buffer("s", torch.rand(n, k // group) + 0.1)
        self.register_buffer("z", torch.randint(0, 16, (n, k // group)).float())

    def forward(self, x):
        g = self.group
        w = (self.q.to(x.dtype) - self.z.repeat_interleave(g, 1)) * self.s.repeat_interleave(g, 1)
        return F.linear(x, w)


class InputScaleLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("q", torch.randint(-127, 128, (32, 64), dtype=torch.int8))

    def forward(self, x, s):
        return F.linear(x, self.q.to(x.dtype) * s[:, None])


class ExpLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("q", torch.randint(-3, 3, (32, 64), dtype=torch.int8))

    def forward(self, x):
        return F.linear(x, self.q.to(x.dtype).exp())


class RawIntMM(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randint(-127, 128, (32, 64), dtype=torch.int8))

    def forward(self, x):
        xq = x.round().clamp(-128, 127).to(torch.int8)
        return torch._int_mm(xq, self.w.t())


class TokenGram(nn.Module):
    """Embeddings of token ids times their transpose: an activation x activation matmul whose
    operands are computed from an integer graph input (int64 ids, not quantized codes)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)

    def forward(self, tokens):
        x = self.emb(tokens)
        return x @ x.t()


class WeightLeft(nn.Module):
    """W @ x.T: the dequantized weight as the first operand."""

    def __init__(self):
        super().__init__()
        self.inner = qcompile.Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32))

    def forward(self, x):
        return (self.inner.qweight.to(x.dtype) * self.inner.scales[:, None]) @ x.t()


class SplitAfterDequant(nn.Module):
    """A merged weight of two layers dequantized whole, then split for one of them."""

    def __init__(self):
        super().__init__()
        self.inner = qcompile.Int8WeightOnlyLinear.from_linear(nn.Linear(64, 64))

    def forward(self, x):
        w = self.inner.qweight.to(x.dtype) * self.inner.scales[:, None]
        return F.linear(x, w[:32])


class GroupsAlongRows(nn.Module):
    """int4 codes whose scales and zeros are shared by 16 consecutive rows of each column
    (quantization groups along N, HQQ's axis=0)."""

    def __init__(self, n=32, k=64, rows=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("q", torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
        self.register_buffer("s", torch.rand(n // rows, k, generator=g) + 0.5)
        self.register_buffer("z", torch.randint(0, 16, (n // rows, k), generator=g).float())
        self.rows = rows

    def forward(self, x):
        s = self.s.repeat_interleave(self.rows, 0)
        z = self.z.repeat_interleave(self.rows, 0)
        return F.linear(x, (self.q.float() - z) * s)


@pytest.mark.parametrize("model,inputs,reason", [
    (GroupDequantLinear(), (torch.randn(4, 96),),
     "group size 24 not supported (kernels take 32, 64, 128, 256 or per-channel)"),
    (InputScaleLinear(), (torch.randn(4, 64), torch.rand(32)),
     "weight operand is not constant (activation x activation matmul)"),
    (ExpLinear(), (torch.randn(4, 64),),
     "weight produced by an op we do not read: aten.exp.default"),
    (nn.Linear(64, 32), (torch.randn(4, 64),), "weight is a float constant (not quantized)"),
    (RawIntMM(), (torch.randn(20, 64) * 20,), "_int_mm result is not rescaled in float32"),
    (qcompile.quantize(nn.Sequential(nn.Linear(64, 32)).double(), "w8a16"),
     (torch.randn(4, 64, dtype=torch.float64),), "activation dtype torch.float64 not supported"),
    (TokenGram(), (torch.randint(0, 100, (8,)),),
     "weight operand is not constant (activation x activation matmul)"),
    (WeightLeft(), (torch.randn(4, 64),),
     "the quantized weight is the first operand (W @ x.T): qcompile reads x @ W.T (F.linear), "
     "the same values transposed; write it that way"),
    (SplitAfterDequant(), (torch.randn(4, 64),),
     "only an integer tensor larger than the weight feeds it: a part of a larger dequantized "
     "tensor (a merged q/k/v or padded weight split or sliced after dequantizing)? Slice the "
     "integer weight and its scales before dequantizing"),
    (GroupsAlongRows(), (torch.randn(4, 64),),
     "scales and zeros are shared by groups of rows (output channels) and vary along K: the "
     "kernels take groups along K (HQQ: axis=1)"),
], ids=["group24", "input-scale", "exp", "float", "int_mm-raw", "float64", "token-ids",
        "weight-left", "split-after-dequant", "groups-along-rows"])
def test_near_misses_are_reported_and_left_correct(model, inputs, reason):
    report = qcompile.explain(model, *inputs)
    assert len(report) == 1
    rec = report.records[0]
    assert not rec.matched and rec.reason == reason
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile")(*inputs)
        torch.testing.assert_close(out, model(*inputs), rtol=1e-4, atol=1e-3)


def test_training_graph_is_left_alone_with_a_reason():
    model = nn.Sequential(nn.Linear(64, 64), qcompile.Int8WeightOnlyLinear.from_linear(
        nn.Linear(64, 32)))
    x = torch.randn(4, 64)
    with qcompile.collect() as report:
        out = torch.compile(model, backend="qcompile")(x)
    out.sum().backward()
    assert report.records[0].reason.startswith("training graph (gradients required)")
    assert model[0].weight.grad is not None


def test_report_prints_a_table_and_reads_as_data():
    model = nn.Sequential(qcompile.Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32)),
                          nn.Linear(32, 16))
    report = qcompile.explain(model, torch.randn(3, 64))
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["node", "source", "op", "result"]
    assert "1 of 2 matmuls run as qcompile ops" == lines[-1]
    rows = report.to_dicts()
    assert rows[0]["matched"] and rows[0]["format"] == "w8a16 int8 per-channel"
    assert (rows[0]["n"], rows[0]["k"], rows[0]["m"]) == (32, 64, "3")
    assert rows[0]["source"] == "0" and rows[1]["reason"].startswith("weight is a float")
    assert qcompile.last_report().records[0].node == rows[0]["node"]


def test_info_logging_has_one_line_per_decision(caplog):
    model = nn.Sequential(qcompile.Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32)),
                          nn.Linear(32, 16))
    with caplog.at_level(logging.INFO, logger="qcompile"):
        qcompile.explain(model, torch.randn(3, 64))
    lines = [r.getMessage() for r in caplog.records if r.name == "qcompile"]
    assert len([m for m in lines if m.startswith(("matched", "not matched"))]) == 2
    assert any(m.startswith("matched addmm (0): w8a16 int8 per-channel") for m in lines)


SCRIPT = """
import torch, qcompile
m = torch.nn.Sequential(qcompile.Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 32)))
with torch.no_grad():
    torch.compile(m, backend="qcompile")(torch.randn(3, 64))
"""


def _run(env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)


def test_torch_logs_controls_the_qcompile_logger(tmp_path):
    info = _run({"TORCH_LOGS": "qcompile"})
    assert info.returncode == 0, info.stderr
    assert "matched addmm (0): w8a16 int8 per-channel" in info.stderr
    assert "graph before" not in info.stderr
    debug = _run({"TORCH_LOGS": "+qcompile", "QCOMPILE_DEBUG_DIR": str(tmp_path)})
    assert debug.returncode == 0, debug.stderr
    assert "graph before" in debug.stderr and "graph after" in debug.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["graph_001_after.txt", "graph_001_before.txt"]
    assert "qcompile.mixed_gemm" in (tmp_path / "graph_001_after.txt").read_text()
    assert "qcompile.mixed_gemm" not in (tmp_path / "graph_001_before.txt").read_text()
    quiet = _run({})
    assert "matched" not in quiet.stderr


def test_backend_works_in_a_fresh_interpreter_without_import():
    code = ("import sys, torch\n"
            "m = torch.nn.Linear(64, 32)\n"
            "y = torch.compile(m, backend='qcompile')(torch.randn(2, 64))\n"
            "assert y.shape == (2, 32)\n"
            "assert 'qcompile' in sys.modules  # loaded through the entry point\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd="/")
    assert res.returncode == 0, res.stderr


def test_explain_and_options_check_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module or callable"):
        qcompile.explain(3, torch.randn(2))
    with pytest.raises(Exception, match="options\\['freezing'\\] must be a bool"):
        torch.compile(nn.Linear(4, 4), backend="qcompile",
                      options={"freezing": "yes"})(torch.randn(2, 4))
