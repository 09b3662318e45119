"""benchmarks/decode_attention.py on the CPU: the op's reference meaning (each row attends the keys up to
its token's position) against an explicit softmax, the split plan, and that off the GPU the
op and the reference Llama keep to SDPA."""

from __future__ import annotations

import pytest
import torch

import decode_attention as attention
from llama_model import CONFIGS, Llama


def _explicit(q, k, v, pos):
    """Row r * S + i against keys 0..pos[i], one softmax at a time, float64."""
    b, h, rows, d = q.shape
    s = pos.shape[0]
    out = torch.empty(b, h, rows, d, dtype=torch.float64)
    for r in range(rows):
        p = int(pos[r % s])
        scores = q[:, :, r:r + 1].double() @ k[:, :, :p + 1].double().transpose(-1, -2)
        out[:, :, r:r + 1] = (scores / d ** 0.5).softmax(-1) @ v[:, :, :p + 1].double()
    return out


@pytest.mark.parametrize("b,h,rep,s,t,pos0", [(1, 2, 4, 1, 40, 17), (2, 2, 2, 3, 33, 30),
                                              (1, 1, 1, 1, 16, 0)])
def test_reference_matches_explicit_softmax(b, h, rep, s, t, pos0):
    g = torch.Generator().manual_seed(b * 100 + s)
    q = torch.randn(b, h, rep * s, 64, generator=g)
    k, v = torch.randn(2, b, h, t, 64, generator=g)
    pos = torch.arange(pos0, pos0 + s)
    got = attention.cached_attention(q, k, v, pos)
    torch.testing.assert_close(got.double(), _explicit(q, k, v, pos), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused_with_what_was_given():
    q, k = torch.randn(1, 2, 3, 64), torch.randn(1, 2, 16, 64)
    with pytest.raises(ValueError, match=r"S dividing q's rows, all on one device; got q \(1, 2, 3, 64\)"):
        attention.cached_attention(q, k, k, torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="integer input_pos"):
        attention.cached_attention(q, k, k, torch.tensor([4.0]))
    with pytest.raises(ValueError, match="input_pos .* on cpu"):  # positions off q's device
        attention.cached_attention(q.to("meta"), k.to("meta"), k.to("meta"), torch.tensor([4]))


def test_cpu_tensors_are_not_for_the_kernels():
    q = torch.randn(1, 8, 4, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 64, 128, dtype=torch.bfloat16)
    assert not attention.kernel_takes(q, k, k)


def test_plan_splits_the_keys_into_whole_steps():
    # batch 1, 8 kv heads, 640 keys, 132 SMs: 10 runs of 64 keys (80 CTAs)
    assert attention._plan(8, 640, 132) == (10, 64)
    # batch 8: 5 runs of 128 (320 CTAs)
    assert attention._plan(64, 640, 132) == (5, 128)
    # never more runs than loop steps, every key in one run
    for bh, keys in [(1, 100), (3, 4000), (1000, 64)]:
        splits, per = attention._plan(bh, keys, 132)
        assert per % 64 == 0 and splits * per >= keys > (splits - 1) * per


def test_llama_on_cpu_keeps_sdpa():
    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"]).eval()
    model.setup_caches(1, 32)
    gm, _ = torch._dynamo.export(model)(torch.tensor([[1]]), torch.tensor([5]))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("scaled_dot_product_attention" in t for t in targets)
    assert not any("cached_attention" in t for t in targets)
