"""W8A8 (int8 x int8) linear: qcompile's CUTLASS kernels against cuBLAS bf16 and Inductor.

Patterns (BASELINES.md):
- w8a8_static: xq int8 [M, K] given, per-tensor activation scale; out = rescale(_int_mm) + bias.
- w8a8_dynamic: x bf16 given; per-token quantization of x is part of the timed work (for
  qcompile a torch.compile'd quantization followed by the kernel).

Implementations: qcompile (heuristic config; with --configs all every sm90 config and
stream-K split mode as ``qcompile[<config>]``), qcompile_sm80, cublas_bf16 (F.linear in
bf16), int_mm_unfused (torch._int_mm + float rescale, M > 16), inductor (torch.compile of
the unfused pattern), inductor_max_autotune, and read_floor (no GEMM: a kernel that only
reads the int8 weight's bytes, timed the same way: what streaming it costs here).

Timing as BASELINES.md says: one process; each implementation captured in a CUDA graph and
``graph.replay`` timed by ``triton.testing.do_bench``, the L2 flushed before every call by
reading a 256 MB buffer (``--flush clean``, the default: weights come from HBM, the L2 holds
clean lines) or by do_bench's own zero-fill (``--flush zero``, how rows without "flush" were
timed); medians in microseconds. Appends one JSON line per cell to --out, each with its
"flush", and prints a table with the speed-up over cublas_bf16 (``--table-from`` reads the
rows of one flush, ``--flush``'s).

    python benchmarks/bench_w8a8.py [--quick] [--configs all] [--flush clean|zero] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import FLUSHES, commit, read_floor, time_graph  # noqa: E402

from qcompile.kernels import int8_gemm as ig  # noqa: E402
from qcompile.kernels import mixed_gemm_decode as decode  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
MS = (1, 16, 64, 256, 2048, 8192)
QUICK_SHAPES = ((4096, 4096), (14336, 4096))
QUICK_MS = (1, 16, 64, 256, 2048)
PATTERNS = ("w8a8_static", "w8a8_dynamic")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_w8a8.jsonl"


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8 quantization: (xq [M, K] int8, scale [M, 1] float32)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8)
    scale = amax / 127.0
    xq = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return xq, scale


def unfused(xq, wq_t, xs, ws, bias):
    return (torch._int_mm(xq, wq_t).float() * xs * ws + bias).to(torch.bfloat16)


def unfused_dynamic(x, wq_t, ws, bias):
    xq, xs = quantize_per_token(x)
    return unfused(xq, wq_t, xs, ws, bias)


def impls_for(pattern: str, m: int, n: int, k: int, args) -> dict[str, Callable[[], object]]:
    """name -> zero-argument callable running one implementation on fresh random inputs."""
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    wq_t = wq.t()  # _int_mm's column-major second operand: the same bytes
    ws = torch.rand(1, n, device=dev) * 1e-2 + 1e-3
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    xq_static = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    xs_static = torch.full((1, 1), 0.02, device=dev)
    quant = torch.compile(quantize_per_token, dynamic=False)

    def qcompile_fn(cfg=None):
        if pattern == "w8a8_static":
            return lambda: ig.int8_gemm_cuda(xq_static, wq, xs_static, ws, bias, torch.bfloat16, cfg)

        def run():
            xq, xs = quant(x)
            return ig.int8_gemm_cuda(xq, wq, xs, ws, bias, torch.bfloat16, cfg)
        return run

    out: dict[str, Callable[[], object]] = {}
    out["cublas_bf16"] = lambda: F.linear(x, w, bias)
    out["read_floor"] = read_floor(wq)
    out["qcompile"] = qcompile_fn()
    if args.configs and ig.device_arch() == "sm_90a":
        for cfg in ig.available_configs("sm_90a"):
            if args.configs != "all" and cfg.name not in args.configs.split(","):
                continue
            for splits in ((0, 1, 2, 4) if cfg.streamk else (0,)):
                c = dataclasses.replace(cfg, splits=splits)
                out[f"qcompile[{ig.config_name(c)}]"] = qcompile_fn(c)
    if args.decode and ig.decode_fits(m, n, k):
        for name in decode.candidates(m, n, k):
            out[f"qcompile[{name}]"] = qcompile_fn(decode.choice_from_name(name))
    out["qcompile_sm80"] = qcompile_fn(ig.choose_config(m, n, k, torch.bfloat16, "sm_80"))
    if pattern == "w8a8_static":
        eager = lambda: unfused(xq_static, wq_t, xs_static, ws, bias)  # noqa: E731
        compiled = torch.compile(unfused, dynamic=False)
        inductor = lambda: compiled(xq_static, wq_t, xs_static, ws, bias)  # noqa: E731
        if not args.no_max_autotune:
            compiled_ma = torch.compile(unfused, dynamic=False, mode="max-autotune-no-cudagraphs")
            inductor_ma = lambda: compiled_ma(xq_static, wq_t, xs_static, ws, bias)  # noqa: E731
    else:
        eager = lambda: unfused_dynamic(x, wq_t, ws, bias)  # noqa: E731
        compiled = torch.compile(unfused_dynamic, dynamic=False)
        inductor = lambda: compiled(x, wq_t, ws, bias)  # noqa: E731
        if not args.no_max_autotune:
            compiled_ma = torch.compile(unfused_dynamic, dynamic=False, mode="max-autotune-no-cudagraphs")
            inductor_ma = lambda: compiled_ma(x, wq_t, ws, bias)  # noqa: E731
    if m > 16:  # torch._int_mm refuses M <= 16
        out["int_mm_unfused"] = eager
    out["inductor"] = inductor
    if not args.no_max_autotune and m in args.max_autotune_ms:
        out["inductor_max_autotune"] = inductor_ma
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer cells (2 shapes, M <= 2048)")
    p.add_argument("--configs", default=None,
                   help="also time these sm90 configs ('all' or comma-separated names), "
                        "stream-K ones with every split mode")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--decode", action="store_true",
                   help="also time every decode-kernel launch shape (M <= 32): 'qcompile[decode...]'")
    p.add_argument("--ms", default=None, help="comma-separated M values")
    p.add_argument("--no-max-autotune", action="store_true")
    p.add_argument("--max-autotune-ms", default="1,16,64,256,2048,8192",
                   help="M values for which inductor_max_autotune is compiled (slow to build)")
    p.add_argument("--shapes", default=None, help="comma-separated NxK, e.g. 4096x4096,14336x4096")
    p.add_argument("--impls", default=None,
                   help="comma-separated name prefixes of the implementations to time (default: all)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per cell")
    p.add_argument("--flush", choices=FLUSHES, default="clean",
                   help="L2 flush before each timed call: clean = read a 256 MB buffer "
                        "(BASELINES.md), zero = do_bench's zero-fill (dirty lines)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--table-from", default=None, metavar="JSONL",
                   help="print the table of recorded results (latest per cell, --flush's rows) "
                        "and exit")
    return p.parse_args(argv)


def make_row(meta: dict, pattern: str, n: int, k: int, m: int, impl: str, us: float,
             flush: str) -> dict:
    """One result line: the cell, the median and the L2 flush it was timed under."""
    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")
    return {"bench": "w8a8", "pattern": pattern, "n": n, "k": k, "m": m, "impl": impl,
            "median_us": round(us, 2), "flush": flush, **meta}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table_from:
        table_from(Path(args.table_from), args)
        return
    args.max_autotune_ms = {int(v) for v in args.max_autotune_ms.split(",") if v}

    torch.backends.cuda.matmul.allow_tf32 = False
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = max(1, min(16, os.cpu_count() or 1))
    torch._dynamo.config.cache_size_limit = 1024
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1024

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    wanted = tuple(args.impls.split(",")) if args.impls else None
    ms = tuple(int(v) for v in args.ms.split(",")) if args.ms else (QUICK_MS if args.quick else MS)
    device = torch.cuda.get_device_name()
    meta = {"device": device, "torch": torch.__version__, "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/bench_w8a8.py", *sys.argv[1:]])}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[tuple[str, int, int, str], dict[int, float | None]] = {}
    for pattern in args.patterns.split(","):
        for n, k in shapes:
            for m in ms:
                torch.manual_seed(m + n + k)
                for impl, fn in impls_for(pattern, m, n, k, args).items():
                    if wanted and impl != "cublas_bf16" and not impl.startswith(wanted):
                        continue
                    try:
                        us: float | None = time_graph(fn, args.rep_ms, args.flush)
                    except Exception as e:  # an implementation that cannot run this cell
                        print(f"# {pattern} {n}x{k} M={m} {impl}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}", flush=True)
                        us = None
                    rows.setdefault((pattern, n, k, impl), {})[m] = us
                    if us is not None:
                        rec = make_row(meta, pattern, n, k, m, impl, us, args.flush)
                        with out_path.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                    print(f"{pattern} {n}x{k} M={m} {impl}: "
                          f"{'-' if us is None else f'{us:.1f} us'}", flush=True)
                torch.cuda.empty_cache()
    print_table(rows, ms, device, flush=args.flush)


def table_from(path: Path, args) -> None:
    """Print the table of a results file: the latest record of each cell and implementation
    among those timed with ``args.flush`` (rows without "flush" were timed with "zero")."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("flush", "zero") == args.flush]
    wanted = tuple(args.impls.split(",")) if args.impls else None
    rows: dict[tuple[str, int, int, str], dict[int, float | None]] = {}
    for r in sorted(recs, key=lambda r: r["date"]):
        if wanted and r["impl"] != "cublas_bf16" and not r["impl"].startswith(wanted):
            continue
        rows.setdefault((r["pattern"], r["n"], r["k"], r["impl"]), {})[r["m"]] = r["median_us"]
    ms = sorted({m for by_m in rows.values() for m in by_m})
    order = {p: i for i, p in enumerate(PATTERNS)}
    rows = dict(sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1], kv[0][2])))
    last = max(recs, key=lambda r: r["date"]) if recs else {}
    print_table(rows, ms, last.get("device", "?"), last.get("torch", "?"), args.flush)


def print_table(rows, ms, device, torch_version: str = torch.__version__,
                flush: str = "clean") -> None:
    print(f"\n# W8A8 linear, median us (speed-up vs cublas_bf16), {device}, torch {torch_version}, "
          f"L2 flush {flush}")
    print("| pattern | N x K | impl | " + " | ".join(f"M={m}" for m in ms) + " |")
    print("|---|---|---|" + "---|" * len(ms))
    for (pattern, n, k, impl), by_m in rows.items():
        base = rows.get((pattern, n, k, "cublas_bf16"), {})
        cells = []
        for m in ms:
            us = by_m.get(m)
            if us is None:
                cells.append("-")
            elif impl == "cublas_bf16" or base.get(m) is None:
                cells.append(f"{us:.1f}")
            else:
                cells.append(f"{us:.1f} ({base[m] / us:.2f}x)")
        print(f"| {pattern} | {n}x{k} | {impl} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
