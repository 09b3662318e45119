"""Quantize a small Llama-style model, compile it with backend="qcompile", check the numbers.

    python examples/demo.py [--method w4a16|w8a16|w8a8|nf4|fp4|all] [--device cpu|cuda]

Prints the match report (which linears became qcompile ops, on which kernel) and the
relative error of the compiled model against the same quantized model run eagerly.
On a machine without a GPU the ops run their reference implementations.
Exits non-zero if any linear was not replaced or the error is over tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import qcompile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from llama_model import Llama, LlamaConfig  # noqa: E402  (the project's small test model)

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
CONFIG = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate=512, max_seq_len=128)


def run(method: str, device: str, dtype: torch.dtype) -> bool:
    torch.manual_seed(0)
    model = Llama(CONFIG).to(device=device, dtype=dtype)
    qcompile.quantize(model, method, group_size=128)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 16), device=device)
    start = time.perf_counter()
    with torch.no_grad(), qcompile.collect() as report:
        expected = model(tokens)
        compiled = torch.compile(model, backend="qcompile")
        got = compiled(tokens)
    seconds = time.perf_counter() - start
    err = float((got.double() - expected.double()).norm() / expected.double().norm())
    n_linear = 7 * CONFIG.n_layers + 1
    ok = len(report.matched) == n_linear and err <= TOLERANCE[dtype]
    print(f"\n== {method} ({dtype}, {device}) ==")
    print(report)
    print(f"relative error vs eager: {err:.2e} (tolerance {TOLERANCE[dtype]:.0e}); "
          f"{len(report.matched)}/{n_linear} linears replaced; compiled in {seconds:.1f}s; "
          f"{'OK' if ok else 'FAILED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="all", choices=["all", *qcompile.formats.METHODS])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    methods = qcompile.formats.METHODS if args.method == "all" else (args.method,)
    dtype = getattr(torch, args.dtype)
    results = [run(m, args.device, dtype) for m in methods]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
