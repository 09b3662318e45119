"""Every decode-kernel launch shape beside the heuristic's pick and the peers, one process,
clean flush: affine int4 g128+zeros (fp16, beside Marlin, cuBLAS and the read floor) and NF4
b64 (bf16, the lookup-table decode kernel), at 1 / 16 / 32 / 64 tokens, including shapes the
heuristic never offers (token tiles over the grid's y beyond 32 tokens). What it is for: the
evidence behind the decode kernel's launch rules (docs/design.md).

    python benchmarks/bench_decode_shapes.py [--out FILE] [--plan default|w8a16|sz16]
    (FILE defaults to decode_shapes.jsonl in $OUT or /tmp; the w8a16 plan: int8 per-channel;
    sz16: int4 at 16 tokens, the 16-token tile's 32- and 64-row launches with and without
    staged scales)

Rows: bench "decode_shapes", one per (pattern, n, k, m, impl), to decode_shapes.jsonl;
SWEEP_BUDGET_S (default 400) stops it early, the most telling cells first."""
import datetime
import json
import os
import sys
import time
import torch
import torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_w4a16 as B
from bench_common import time_graph
from qcompile.kernels import mixed_gemm_decode as d, lut_gemm

out_path = (sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv
            else os.path.join(os.environ.get("OUT", "/tmp"), "decode_shapes.jsonl"))
meta = dict(bench="decode_shapes", flush="clean", device=torch.cuda.get_device_name(),
            torch=torch.__version__, commit=os.environ.get("QCOMPILE_COMMIT", "unknown"),
            date=datetime.date.today().isoformat(),
            command="python benchmarks/bench_decode_shapes.py " + " ".join(sys.argv[1:]))

t_end = time.time() + float(os.environ.get("SWEEP_BUDGET_S", "400"))


def cell(pattern, act, n, k, m, impl, fn, ref=None, **extra):
    if time.time() > t_end:
        return
    try:
        if ref is not None:
            o = fn()
            err = ((o.double() - ref).norm() / ref.norm()).item()
            extra["rel_err"] = err
            if not err < 1e-2:
                print(f"  BAD {impl} {n}x{k} M={m} err {err:.3e}", flush=True)
                return
        us = time_graph(fn)
    except Exception as e:  # noqa
        print(f"  {impl} {n}x{k} M={m} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return
    row = dict(meta, pattern=pattern, n=n, k=k, m=m, impl=impl, median_us=round(us, 2), **extra)
    if act == "fp16":
        row["act"] = "fp16"
    with open(out_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{pattern:14s} {act} {n:5d}x{k:5d} M={m:3d} {impl:36s} {us:8.2f}", flush=True)


_weights = {}


def launch_shapes(m):
    """Every valid launch shape of the two token tiles nearest m (the grid's y covers the rest)."""
    return [c for t in [t for t in (8, 16, 32) if t >= min(m, 16)][:2]
            for r in (16, 32, 64) for wp in (4, 8, 16)
            if (c := d.DecodeChoice(t, r, wp)).valid()]


def staged_16_shapes(m):
    """The sz16 plan: the 16-token tile's 32- and 64-row shapes, scales staged or not."""
    return [c for r in (64, 32) for wp in (8, 4, 16) for sz in (True, False)
            if (c := d.DecodeChoice(16, r, wp, sz)).valid()]


def affine_weights(pattern, n, k):
    key = (pattern, n, k)
    if key not in _weights:
        act = torch.float16
        fmt, w, mod = B.make_weights(pattern, n, k, act)
        made = B.build_impls(pattern, n, k, fmt, w, mod,
                             ("qcompile", "cublas_bf16", "read_floor", "marlin"), act)
        _weights[key] = (w, made, fmt["group"] if fmt["group"] != k else 0)
    return _weights[key]


def affine(ms, pattern="w4a16_g128_zp", shapes=launch_shapes):
    """Affine weights (int4 g128 + zeros, or int8 per-channel) in fp16 at each M, the decode
    kernel forced to each of ``shapes(m)``."""
    d.MAX_TOKENS = 64  # let forced names take 64 tokens (grid.y token tiles)
    act = torch.float16
    for m in ms:
        for n, k in ((14336, 4096), (28672, 4096), (4096, 14336), (4096, 4096)):
            w, made, group = affine_weights(pattern, n, k)
            mode = d.MODE_GROUPZERO if group else d.MODE_ROWSCALE
            x = torch.randn(m, k, device="cuda", dtype=act)
            ref = F.linear(x, w).double()
            for name in ("qcompile", "cublas_bf16", "read_floor", "marlin"):
                if name in made:
                    fn = made[name]
                    cell(pattern, "fp16", n, k, m, name, lambda fn=fn: fn(x),
                         ref if name == "qcompile" else None)
            for c in shapes(m):
                if d.fits(m, n, k, group or k, mode, c):
                    cell(pattern, "fp16", n, k, m, f"qcompile[{c.name}]",
                         lambda c=c: made["qcompile"](x, c.name), ref)
    d.MAX_TOKENS = 32


def nf4(ms):
    act = torch.bfloat16
    for m in ms:
        for n, k in ((14336, 4096), (4096, 4096)):
            key = ("nf4", n, k)
            if key not in _weights:
                fmt, w, mod = B.make_weights("nf4_b64", n, k, act)
                _weights[key] = (w, lut_gemm.prepare(fmt["codes"], fmt["table"], fmt["s"]))
            w, prepared = _weights[key]
            x = torch.randn(m, k, device="cuda", dtype=act)
            ref = F.linear(x, w).double()
            cell("nf4_b64", "bf16", n, k, m, "qcompile",
                 lambda: lut_gemm.run(x, *prepared, None, 64, "float32"), ref)
            orig = lut_gemm.decode_choice
            for c in launch_shapes(m):
                if n % c.rows:
                    continue
                lut_gemm.decode_choice = lambda *a, c=c, **kw: c  # the launch, forced
                try:
                    cell("nf4_b64", "bf16", n, k, m, f"qcompile[{c.name}]",
                         lambda: lut_gemm.run(x, *prepared, None, 64, "float32", "decode"), ref)
                finally:
                    lut_gemm.decode_choice = orig


# what each plan times, in order of what matters most, until the time budget runs out
PLANS = {
    "default": [(affine, (16,)), (nf4, (64, 16)), (affine, (64,)), (nf4, (1, 32)), (affine, (1, 32))],
    "w8a16": [(lambda ms: affine(ms, "w8a16_pc"), (16, 1, 32))],
    # staged scales at 16 tokens (the heuristic stages them up to 8 tokens only)
    "sz16": [(lambda ms: affine(ms, shapes=staged_16_shapes), (16,))],
}


def main():
    plan = sys.argv[sys.argv.index("--plan") + 1] if "--plan" in sys.argv else "default"
    for step, ms in PLANS[plan]:
        step(ms)
    print("sweep done", flush=True)


if __name__ == "__main__":
    main()
