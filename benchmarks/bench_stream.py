"""The GEMMs of a decode step as the model runs them: one after another, each on its own
weight, none of them in the L2 -- the setting the end-to-end decode sees, which the
one-kernel benchmarks (bench_w4a16, L2 flushed by reading -- or, with --flush zero, by
zero-filling -- a 256 MB buffer before every call) do not show.

Patterns: w4a16_g128_zp and w8a16_pc (bench_w4a16's), w8a8_static (qcompile::int8_gemm on
an int8 activation, per-channel weight scales). For each (N, K) of a Llama-3-8B layer
(fused q/k/v, o, fused gate/up, down) it builds `--layers` distinct weights, captures the
calls in one CUDA graph and times its replay (`triton.testing.do_bench` medians); a `step`
row runs the four shapes of every layer in model order. Each row says the time per GEMM and
the bytes of weight read per second.

Implementations: `qcompile` (the heuristic's choice; `qcompile[decode.t8.r32.w4]` forces a
launch shape on every GEMM with `--shapes-sweep`), `qcompile_sm80` (the sm_80 family, not
in the default list: at M <= 8 the same decode kernel on that family's layout, whose 16-row
tiles each hold their K contiguously), `cublas_bf16` (F.linear on the
dequantized bf16 weight) and `read_floor` (a plain Triton kernel that only reads the
qcompile weight's bytes: what streaming those bytes costs in this setting, the floor).

`--flush-check` times `read_floor` and `qcompile` on one 14336x4096 int4 weight under
both L2 flushes: do_bench's zero-fill, which leaves the L2 full of dirty lines that are
written back while the kernel reads, and a flush by reading, which leaves it clean.

Appends one JSON line per cell to benchmarks/results/bench_stream.jsonl (or --out).

  python benchmarks/bench_stream.py [--patterns w4a16_g128_zp,w8a16_pc,w8a8_static] [--ms 1,8]
      [--layers 8] [--shapes-sweep] [--flush-check]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import commit, read_floor  # noqa: E402
from bench_w4a16 import DT, GROUP, make_weights  # noqa: E402

LAYER_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # qkv, o, gate/up, down


def _graph(calls):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    return g


def _median_us(fn, flush: str = "zero", reps: int = 50) -> float:
    """Median microseconds of fn() after an L2 flush: 'zero' (do_bench's) or 'read'."""
    import triton.testing
    if flush == "zero":
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
    buf = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda").fill_(1)
    times = []
    for _ in range(reps):
        buf.sum()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    times.sort()
    return times[len(times) // 2]


class Layerset:
    """`layers` distinct weights of one (N, K): the callables of every implementation."""

    def __init__(self, pattern: str, n: int, k: int, layers: int, impls):
        self.n, self.k = n, k
        self.calls: dict[str, list] = {i: [] for i in impls}
        self.bytes: dict[str, int] = {i: 0 for i in impls}
        for _ in range(layers):
            if pattern == "w8a8_static":
                qweight, nbytes, call, dequant = self._int8_layer(n, k)
            else:
                qweight, nbytes, call, dequant = self._mixed_layer(pattern, n, k)
            self._add("qcompile", call, nbytes)
            if "qcompile_sm80" in self.calls and pattern != "w8a8_static":
                _q, nb80, call80, _d = self._mixed_layer(pattern, n, k, family="sm80")
                self._add("qcompile_sm80", call80, nb80)
            if "cublas_bf16" in self.calls:
                w = dequant()
                self._add("cublas_bf16", lambda x, config=None, w=w: F.linear(x, w),
                          w.numel() * w.element_size())
            if "read_floor" in self.calls:
                f = read_floor(qweight)
                self._add("read_floor", lambda x, config=None, f=f: f(),
                          qweight.numel() * qweight.element_size())

    def _add(self, impl: str, call, nbytes: int) -> None:
        if impl in self.calls:
            self.calls[impl].append(call)
            self.bytes[impl] += nbytes

    @staticmethod
    def _mixed_layer(pattern: str, n: int, k: int, family: str = "sm90"):
        """(packed weight, bytes qcompile reads, its call, the bf16 weight) of a weight-only
        layer prepared for the Hopper family, or with family="sm80" for the sm_80 one (same
        interface; its group-wise layout keeps each 16-row tile's K contiguous)."""
        from qcompile.kernels import mixed_gemm, mixed_gemm_sm80
        mg = mixed_gemm_sm80 if family == "sm80" else mixed_gemm
        fmt, w, _mod = make_weights(pattern, n, k)
        layout = mg.select_layout(fmt["bits"], fmt["signed"], fmt["group"], fmt["zero_mode"],
                                  n, k, DT, "cuda")
        prep = mg.prepare_weight(fmt["q"], fmt["s"], fmt["z"], fmt["bits"], fmt["signed"],
                                 fmt["group"], fmt["zero_mode"], layout, DT)
        args = (*prep, None, fmt["bits"], fmt["signed"], fmt["group"], fmt["zero_mode"], layout)
        nbytes = sum(t.numel() * t.element_size() for t in prep if t is not None)
        return (prep[0], nbytes,
                lambda x, config=None, a=args: mg.mixed_gemm_cuda(x, *a, config=config),
                lambda: w)

    @staticmethod
    def _int8_layer(n: int, k: int):
        """The same for a W8A8 layer: int8 weight, per-channel scales, one per-tensor
        activation scale (its call takes the int8 activation)."""
        from qcompile.kernels import int8_gemm as i8
        wq = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int16).to(torch.int8)
        col = torch.rand(n, device="cuda") * 0.01 + 0.001
        row = torch.full((1,), 0.02, device="cuda")

        def call(x, config=None):
            return i8.int8_gemm_cuda(x, wq, row, col, None, DT,
                                     i8.choice_from_name(config) if config else None)
        return wq, wq.numel(), call, lambda: wq.to(DT) * col[:, None].to(DT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", default="w4a16_g128_zp,w8a16_pc")
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--impls", default="qcompile,cublas_bf16,read_floor")
    ap.add_argument("--shapes-sweep", action="store_true",
                    help="also every decode launch shape (forced on all GEMMs)")
    ap.add_argument("--flush-check", action="store_true")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in LAYER_SHAPES),
                    help="N x K of the GEMMs in step order (default: a Llama-3-8B layer's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_stream.jsonl"))
    args = ap.parse_args(argv)
    from qcompile.kernels import mixed_gemm_decode as decode

    impls = args.impls.split(",")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    meta = dict(bench="bench_stream", device=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([Path(sys.executable).name, *sys.argv]))
    out = open(args.out, "a")  # noqa: SIM115

    def record(**kw):
        out.write(json.dumps(dict(meta, **kw)) + "\n")
        out.flush()

    torch.manual_seed(0)
    with torch.no_grad():
        if args.flush_check:
            ls = Layerset("w4a16_g128_zp", 14336, 4096, 1, ["qcompile", "read_floor"])
            x = torch.randn(1, 4096, device="cuda", dtype=DT)
            for impl in ("read_floor", "qcompile"):
                g = _graph([lambda c=ls.calls[impl][0]: c(x)])
                for flush in ("zero", "read"):
                    us = _median_us(g.replay, flush)
                    print(f"flush-check {impl} 14336x4096 int4 M=1 flush={flush}: {us:.1f} us "
                          f"({ls.bytes[impl] / us / 1e6:.2f} TB/s)", flush=True)
                    record(pattern="w4a16_g128_zp", n=14336, k=4096, m=1, impl=impl,
                           median_us=round(us, 2), flush=flush, layers=1)
            del ls
        for pattern in args.patterns.split(","):
            sets = [Layerset(pattern, n, k, args.layers, impls) for n, k in shapes]
            for m in (int(v) for v in args.ms.split(",")):
                xs = {k: torch.randn(m, k, device="cuda", dtype=DT) for _, k in shapes}
                # W8A8's qcompile call takes the int8 activation; cuBLAS and the floor bf16
                xq = {k: torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
                      for _, k in shapes}
                variants = [(i, None) for i in impls]
                if args.shapes_sweep and "qcompile" in impls:
                    group = GROUP if pattern == "w4a16_g128_zp" else 0  # .sz launches too
                    names = {c for n, k in shapes for c in decode.candidates(m, n, k, group=group)}
                    variants += [("qcompile", c) for c in sorted(names)]
                for impl, config in variants:
                    label = impl if config is None else f"{impl}[{config}]"
                    rows = [(f"{s.n}x{s.k}", [s]) for s in sets] + [("step", sets)]
                    for name, group in rows:
                        if any(not s.calls[impl] for s in group):
                            continue  # (qcompile_sm80 has no W8A8 layer)
                        if config is not None and any(
                                not decode.fits(m, s.n, s.k, 128, decode.MODE_GROUPZERO,
                                                decode.choice_from_name(config))
                                for s in group):
                            continue
                        x_of = xq if pattern == "w8a8_static" and impl == "qcompile" else xs
                        calls = [functools.partial(s.calls[impl][li], x_of[s.k], config)
                                 for li in range(args.layers) for s in group]
                        nbytes = sum(s.bytes[impl] for s in group)
                        try:
                            g = _graph(calls)
                            us = _median_us(g.replay)
                        except Exception as e:  # noqa: BLE001 - report and go on
                            print(f"  {label} {name} M={m} failed: {type(e).__name__}: {e}")
                            continue
                        per = us / len(calls)
                        print(f"{pattern} M={m} {name:>11} {label:<34} {per:7.2f} us/GEMM "
                              f"{nbytes / us / 1e6:5.2f} TB/s", flush=True)
                        n, k = (0, 0) if name == "step" else (group[0].n, group[0].k)
                        record(pattern=pattern, n=n, k=k, m=m, impl=label,
                               median_us=round(per, 2), seq=name, layers=args.layers,
                               tb_per_s=round(nbytes / us / 1e6, 3))
            del sets
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
