"""GPU tests of benchmarks/decode_attention.py's split-K/V kernels against float64: dtypes, head sizes,
query rows (kv-head groups x new tokens), positions at the start, middle and end of the
cache, a batch slice of a larger cache (its strides), split plans with empty runs, and the
op under torch.compile with CUDA graphs; then the reference Llama's decode steps through the
kernels against the same steps through SDPA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

import decode_attention as attention  # noqa: E402
from llama_model import Llama, LlamaConfig  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _rel(got, ref):
    return float((got.double() - ref).norm() / ref.norm())


def _case(b, h, rows, t, d, dtype, seed=0, cache_batch=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, rows, d, device="cuda", dtype=dtype, generator=g)
    cb = cache_batch or b
    k = torch.randn(cb, h, t, d, device="cuda", dtype=dtype, generator=g)[:b]
    v = torch.randn(cb, h, t, d, device="cuda", dtype=dtype, generator=g)[:b]
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,rep,s,t,d,pos0", [
    (1, 8, 4, 1, 640, 128, 600),    # the 8B model's batch-1 step
    (8, 8, 4, 1, 640, 128, 511),    # batch 8
    (1, 8, 4, 1, 640, 128, 0),      # first position: one key
    (1, 8, 4, 1, 640, 128, 639),    # last position: every key
    (2, 4, 2, 5, 300, 64, 100),     # several new tokens, head size 64, empty runs
    (3, 2, 8, 8, 1000, 128, 900),   # 64 rows
    (1, 32, 1, 1, 4096, 128, 4000),  # no grouping, a long cache
])
def test_kernel_against_float64(dtype, b, h, rep, s, t, d, pos0):
    q, k, v = _case(b, h, rep * s, t, d, dtype, seed=pos0)
    pos = torch.arange(pos0, pos0 + s, device="cuda")
    assert attention.kernel_takes(q, k, v)
    out = attention.cached_attention(q, k, v, pos)
    ref = attention.cached_attention_reference(q.double(), k.double(), v.double(), pos)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= TOL[dtype]


def test_batch_slice_of_a_larger_cache():
    q, k, v = _case(2, 8, 4, 256, 128, torch.bfloat16, cache_batch=5)
    pos = torch.tensor([200], device="cuda")
    out = attention.cached_attention(q, k, v, pos)
    ref = attention.cached_attention_reference(q.double(), k.double(), v.double(), pos)
    assert _rel(out, ref) <= 1e-2


def test_shapes_the_kernels_do_not_take_fall_back():
    q, k, v = _case(1, 2, 128, 64, 64, torch.bfloat16)  # 128 rows > 64
    assert not attention.kernel_takes(q, k, v)
    q32, k32, v32 = (x.float() for x in _case(1, 2, 4, 64, 64, torch.bfloat16))
    assert not attention.kernel_takes(q32, k32, v32)
    pos = torch.tensor([40], device="cuda")
    for args in ((q, k, v), (q32, k32, v32)):
        ref = attention.cached_attention_reference(*(x.double() for x in args), pos)
        assert _rel(attention.cached_attention(*args, pos), ref) <= 1e-2


def test_compiled_with_cuda_graphs_follows_the_position():
    q, k, v = _case(1, 8, 4, 640, 128, torch.bfloat16)
    fn = torch.compile(attention.cached_attention, mode="reduce-overhead", fullgraph=True)
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    for p in (100, 101, 500, 639):
        pos.fill_(p)
        out = fn(q, k, v, pos).clone()
        ref = attention.cached_attention_reference(q.double(), k.double(), v.double(), pos)
        assert _rel(out, ref) <= 1e-2, p


def test_llama_decode_through_the_kernels_matches_sdpa(monkeypatch):
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=256, n_heads=4, n_kv_heads=2, intermediate=512, max_seq_len=64)
    model = Llama(cfg).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda")  # 80 rows: SDPA
    real_op = attention.cached_attention
    calls = []

    def counted(*args):
        calls.append(1)
        return real_op(*args)

    def decode(use_kernels):
        monkeypatch.setattr(attention, "cached_attention", counted)
        if not use_kernels:
            monkeypatch.setattr(attention, "kernel_takes", lambda *args: False)
        model.setup_caches(2, 64)
        with torch.no_grad():
            model(prompt, torch.arange(40, device="cuda"))
            logits = [model(prompt[:, -1:], torch.tensor([p], device="cuda"))
                      for p in range(40, 48)]
        return torch.cat(logits, 1).double()

    with_kernels = decode(True)
    assert len(calls) == cfg.n_layers * 8  # every decode step's layers, not the prompt's
    with_sdpa = decode(False)
    assert len(calls) == cfg.n_layers * 8
    assert _rel(with_kernels, with_sdpa) <= 1e-2
