"""options={"prefetch_weights": True} (the default): each qcompile op is handed the next
one's weight, whose start a decode kernel has the L2 fetch (CPU: the graph links and
unchanged numbers; the GPU tests run the kernels with it)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.llama import CONFIGS, Llama
from test_backend import QC_OPS, rel_err


class _Links:
    """For the post-grad graph Inductor compiles: per qcompile op (in graph order) what its
    weight operand and its prefetch argument read (a module attribute or a graph input)."""

    def __init__(self):
        self.ops: list[tuple[str, str | None]] = []

    def __call__(self, graph):
        def source(node):
            if node is None:
                return None
            assert node.op in ("get_attr", "placeholder"), node.op
            return node.target if node.op == "get_attr" else f"input {node.name}"
        self.ops = [(source(n.args[1]), source(n.kwargs.get("prefetch")))
                    for n in graph.nodes if n.op == "call_function" and n.target in QC_OPS]

    @contextlib.contextmanager
    def installed(self):
        with torch._inductor.config.patch(post_grad_custom_post_pass=self):
            yield self


@pytest.mark.parametrize("method", ["w4a16", "w8a8"])
def test_each_op_prefetches_the_next_weight(method):
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIGS["tiny"]).to(torch.bfloat16), method, group_size=64)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (1, 6))
    pos = torch.arange(6)
    outs = {}
    with torch.no_grad():
        ref = model.setup_caches(1, 32) or model(tokens, pos)
        for prefetch in (True, False):
            model.setup_caches(1, 32)
            torch._dynamo.reset()
            links = _Links()
            with links.installed():
                outs[prefetch] = torch.compile(model, backend="qcompile", options={
                    "prefetch_weights": prefetch})(tokens, pos)
            ops = links.ops
            assert len(ops) == 9  # 2 layers x (q/k/v, o, gate/up, down) + the head
            if prefetch:
                assert [pf for _, pf in ops[:-1]] == [w for w, _ in ops[1:]]
                assert ops[-1][1] is None  # the last op has none to prefetch
            else:
                assert all(pf is None for _, pf in ops)
    assert torch.equal(outs[True], outs[False])  # a hint to the cache, never to the numbers
    assert rel_err(outs[True], ref) <= 2e-2


def test_option_is_checked():
    with pytest.raises(Exception, match="options\\['prefetch_weights'\\] must be a bool"):
        torch.compile(nn.Linear(4, 4), backend="qcompile",
                      options={"prefetch_weights": 1})(torch.randn(2, 4))


def test_ops_take_and_ignore_prefetch():
    w = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    x = torch.randint(-128, 128, (3, 64), dtype=torch.int8)
    args = (x, w, torch.rand(3, 1), torch.rand(32), None, torch.bfloat16)
    other = torch.randint(-128, 128, (48, 64), dtype=torch.int8)
    assert torch.equal(torch.ops.qcompile.int8_gemm(*args),
                       torch.ops.qcompile.int8_gemm(*args, prefetch=other))
