"""Fuzz: random weight expressions over integer and float constants before a matmul.

Each case builds a module whose weight is a random program (unpacking, bit ops, casts,
gathers, ``where``, reshapes on integer constants; casts, table lookups, affine and
non-affine float ops after), compiles it with backend="qcompile" and checks that the
compile never raises and that the result equals eager's: a rewrite must never change the
numbers. The cases must include both outcomes (taken over and left alone), or the fuzz
would test nothing.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import qcompile

N, K, G = 32, 128, 32
INT_OPS = ["mask", "xor", "shift", "where", "gather", "index", "transpose", "reshape", "cast",
           "clamp"]
FLOAT_OPS = ["affine_groups", "affine_repeat", "row_scale", "offset", "square", "where", "abs",
             "index", "neg"]


class RandomWeight(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        self.program: tuple = ()
        packing = rng.choice(["int8", "nibbles", "words", "uint8"])
        if packing == "nibbles":
            self.register_buffer("packed", torch.randint(0, 256, (N, K // 2), generator=g,
                                                         dtype=torch.uint8))
        elif packing == "words":
            self.register_buffer("packed", torch.randint(-2**31, 2**31 - 1, (N, K // 8),
                                                         generator=g, dtype=torch.int32))
        elif packing == "int8":
            self.register_buffer("packed", torch.randint(-128, 128, (N, K), generator=g,
                                                         dtype=torch.int8))
        else:
            self.register_buffer("packed", torch.randint(0, 16, (N, K), generator=g,
                                                         dtype=torch.uint8))
        self.packing = packing
        self.register_buffer("perm", torch.randperm(K, generator=g))
        self.register_buffer("table", torch.randn(16, generator=g))
        self.register_buffer("scales", torch.rand(N, K // G, generator=g) + 0.1)
        self.register_buffer("zeros", torch.randint(0, 16, (N, K // G), generator=g).float())
        self.register_buffer("mask", torch.rand(N, K, generator=g) > 0.2)
        self.register_buffer("row", torch.rand(N, generator=g) + 0.5)
        steps = [("int", rng.choice(INT_OPS), rng.randint(1, 7)) for _ in range(rng.randint(0, 3))]
        steps.append(("to_float", rng.choice(["cast", "cast", "lut"]), 0))
        steps += [("float", rng.choice(FLOAT_OPS), rng.randint(1, 7))
                  for _ in range(rng.randint(0, 3))]
        self.program = tuple(steps)
        self.spelling = rng.choice(["linear", "matmul_t", "at"])
        self.dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])

    def unpack(self) -> torch.Tensor:
        p = self.packed
        if self.packing == "nibbles":
            return torch.stack([p & 15, p >> 4], dim=-1).reshape(N, K)
        if self.packing == "words":
            shifts = torch.arange(0, 32, 4, device=p.device, dtype=torch.int32)
            return ((p[:, :, None] >> shifts) & 15).reshape(N, K)
        return p

    def weight(self) -> torch.Tensor:
        q = self.unpack()
        w = None
        for kind, op, c in self.program:
            if kind == "int":
                if op == "mask":
                    q = q & (2 ** (c % 4 + 1) - 1)
                elif op == "xor":
                    q = q ^ c
                elif op == "shift":
                    q = (q << 1) >> 1
                elif op == "where":
                    q = torch.where(q > c, q, q - c)
                elif op == "gather":
                    q = torch.gather(q, 1, self.perm.expand(N, K))
                elif op == "index":
                    q = q[:, self.perm]
                elif op == "transpose":
                    q = q.t().contiguous().t()
                elif op == "reshape":
                    q = q.reshape(N, K // G, G).reshape(N, K)
                elif op == "cast":
                    q = q.to([torch.int16, torch.int32, torch.int64][c % 3])
                elif op == "clamp":
                    q = q.clamp(-c, 4 * c)
            elif kind == "to_float":
                w = self.table[q.long() & 15] if op == "lut" else q.to(self.dtype)
            else:
                if op == "affine_groups":
                    w = ((w.reshape(N, K // G, G) - self.zeros[..., None])
                         * self.scales[..., None]).reshape(N, K)
                elif op == "affine_repeat":
                    w = w * self.scales.repeat_interleave(G, dim=1)
                elif op == "row_scale":
                    w = w * self.row[:, None]
                elif op == "offset":
                    w = w + c / 8
                elif op == "square":
                    w = w * w
                elif op == "where":
                    w = torch.where(self.mask, w, torch.zeros_like(w))
                elif op == "abs":
                    w = w.abs()
                elif op == "index":
                    w = w[:, self.perm]
                elif op == "neg":
                    w = -w
        return w.to(self.dtype)

    def forward(self, x):
        w = self.weight()
        if self.spelling == "linear":
            return F.linear(x, w)
        if self.spelling == "matmul_t":
            return torch.matmul(x, w.t())
        return x @ w.T


def test_random_weight_expressions_never_raise_and_never_change_the_numbers():
    outcomes = {True: 0, False: 0}
    for seed in range(32):
        torch._dynamo.reset()
        model = RandomWeight(seed)
        x = torch.randn(5, K, dtype=model.dtype)
        with torch.no_grad(), qcompile.collect() as report:
            out = torch.compile(model, backend="qcompile")(x)
            ref = model(x)
        assert len(report) == 1, (seed, model.program, str(report))
        rec = report.records[0]
        outcomes[rec.matched] += 1
        tol = 1e-4 if model.dtype == torch.float32 else 1e-2
        err = rel_err(out, ref) if ref.norm() > 0 else float((out - ref).abs().max())
        assert err <= tol, (seed, model.program, model.packing, str(report), err)
    # both outcomes occur: the fuzz reaches the rewrite and the refusals
    assert outcomes[True] >= 5 and outcomes[False] >= 5, outcomes


@pytest.mark.parametrize("seed", [1001, 1002])
def test_random_weights_under_dynamic_shapes(seed):
    model = RandomWeight(seed)
    compiled = torch.compile(model, backend="qcompile", dynamic=True)
    with torch.no_grad():
        for m in (3, 9):
            x = torch.randn(m, K, dtype=model.dtype)
            tol = 1e-4 if model.dtype == torch.float32 else 1e-2
            assert rel_err(compiled(x), model(x)) <= tol
