"""The backend on CUDA: a quantized decoder compiles to qcompile ops and matches eager,
also under CUDA graphs (mode="reduce-overhead")."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.llama import Llama, LlamaConfig

pytestmark = pytest.mark.gpu
CONFIG = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate=512, max_seq_len=128)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "w8a8"])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_decoder_on_cuda(method, mode):
    torch.manual_seed(0)
    model = qcompile.quantize(Llama(CONFIG).to("cuda", torch.bfloat16), method, group_size=128)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 32), device="cuda")
    with torch.no_grad(), qcompile.collect() as report:
        ref = model(tokens)
        compiled = torch.compile(model, backend="qcompile", mode=mode)
        for _ in range(3):  # CUDA graphs record on a later call
            out = compiled(tokens)
    assert len(report.matched) == len(report) == 15, str(report)
    print(report)
    assert _rel(out, ref) <= 2e-2
