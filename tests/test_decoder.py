"""A small Llama-style decoder: every quantized linear is replaced and the output matches."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, rel_err

import qcompile
from llama_model import CONFIGS, Llama

N_LINEARS = 7 * CONFIGS["tiny"].n_layers + 1  # q, k, v, o, w1, w3, w2 per layer + output


@pytest.mark.parametrize("method,kwargs", [
    ("w4a16", dict(group_size=32, packing="awq")), ("w8a16", {}), ("w8a8", {})],
    ids=["w4a16-awq", "w8a16", "w8a8"])
def test_every_linear_of_a_decoder_is_replaced(method, kwargs):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = qcompile.quantize(Llama(CONFIGS["tiny"]).to(dtype), method, **kwargs)
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad(), qcompile.collect() as report:
        ref = model(tokens)
        out = torch.compile(model, backend="qcompile")(tokens)
    assert len(report.matched) == N_LINEARS == len(report), str(report)
    assert report.graphs == 1  # one graph for the whole model: the ops cause no graph break
    assert {r.source for r in report.records} >= {"layers.0.attention.wq", "output",
                                                  "layers.1.feed_forward.w2"}
    assert rel_err(out, ref) <= TOL[dtype]


def test_decode_with_kv_cache_under_dynamic_positions():
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIGS["tiny"]), "w4a16", group_size=64)
    model.setup_caches(max_batch=2, max_seq=32)
    prompt = torch.randint(0, 256, (2, 6))
    step = torch.compile(model, backend="qcompile")
    with torch.no_grad(), qcompile.collect() as report:
        eager_logits = model(prompt, torch.arange(6))
        logits = step(prompt, torch.arange(6))
        assert rel_err(logits, eager_logits) <= TOL[torch.float32]
        tok = logits[:, -1:].argmax(-1)
        for pos in range(6, 9):
            out = step(tok, torch.tensor([pos]))
            tok = out[:, -1:].argmax(-1)
    assert report.records and all(r.matched for r in report.records)
