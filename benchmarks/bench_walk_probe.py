"""What limits the int4 decode kernel at one token: its weight walk alone against the kernel
and the read floor (issue 25's M <= 16 cells).

``walk_probe.cu`` (beside this file, built here with nvcc) reads a prepared int4 weight exactly
as the decode kernel's main loop does -- the heuristic's launch shape (32-row CTAs of its warps),
the same rounds of 16-byte loads, the CTAs an SM held to the decode kernel's count by a shared
memory request -- but only xors the words it loads. Rows (impls): ``qcompile`` (the decode
kernel's pick), ``read_floor`` (bench_common's), ``probe[sm90 loads4]`` (the walk),
``probe[tile-major loads4]`` (each row tile's chunks contiguous), ``probe[sm90 loads8]`` (two
rounds of loads in flight), ``probe[ring2 loads4]`` / ``probe[ring3 loads4]`` (the walk through
a per-warp ring of 2 / 3 rounds filled by cp.async), ``probe[bulk2 loads4]`` / ``[bulk3 ...]``
(the same ring filled by the Hopper bulk copy, one 128-byte line an instruction). One process, clean flush, CUDA-graph
replays (bench_common.time_graph); appends to benchmarks/results/walk_probe.jsonl (or --out).

  python benchmarks/bench_walk_probe.py [--shapes 4096x4096,14336x4096,4096x14336,28672x4096]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import subprocess
import tempfile
from pathlib import Path

import torch

import bench_w4a16 as bw
from bench_common import commit, time_graph

HERE = Path(__file__).resolve().parent
# (N, K) -> (warps a CTA, CTAs an SM) of the decode kernel's pick at one token on an H100
# (mixed_gemm_decode.heuristic; its registers and capped_smem set the CTAs an SM)
DECODE_LAUNCH = {(4096, 4096): (16, 1), (14336, 4096): (8, 4), (4096, 14336): (16, 1),
                 (28672, 4096): (4, 8)}
SMEM_PER_SM, SMEM_RESERVED = 233472, 1024  # H100: 228 KB an SM, 1 KB reserved a CTA
VARIANTS = (("sm90 loads4", 4, 0), ("tile-major loads4", 4, 1), ("sm90 loads8", 8, 0),
            ("ring2 loads4", 4, 2), ("ring3 loads4", 4, 3), ("bulk2 loads4", 4, 4),
            ("bulk3 loads4", 4, 5))


def ring_bytes(warps: int, loads: int, variant: int) -> int:
    """Shared memory of a variant's rings (walk_probe.cu's qc_walk_probe adds it to the request)."""
    if variant in (2, 3):  # cp.async: rounds of 512-byte chunk-tiles
        return warps * variant * loads * 512
    if variant in (4, 5):  # bulk copies: 640-byte chunk-tiles (padded lines) and an mbarrier a round
        return warps * (variant - 2) * (loads * 640 + 16)
    return 0


def build() -> ctypes.CDLL:
    from qcompile.kernels.build import find_nvcc
    so = Path(tempfile.mkdtemp()) / "walk_probe.so"
    subprocess.run([find_nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart",
                    "shared", "-gencode=arch=compute_90,code=sm_90",
                    "-I", str(HERE.parent / "qcompile" / "kernels" / "csrc"), str(HERE / "walk_probe.cu"),
                    "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.qc_walk_probe.restype = ctypes.c_int
    lib.qc_walk_probe.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_void_p]
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in DECODE_LAUNCH))
    ap.add_argument("--out", default=str(HERE / "results" / "walk_probe.jsonl"))
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("bench_walk_probe: the probe is built for sm_90 (an H100 or H200)")
    lib, act = build(), torch.bfloat16
    meta = dict(bench="walk_probe", device=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                flush="clean", command="python benchmarks/bench_walk_probe.py", pattern="w4a16_g128_zp",
                act="bf16", m=1)
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        warps, ctas = DECODE_LAUNCH[(n, k)]
        fmt, w, mod = bw.make_weights("w4a16_g128_zp", n, k, act)
        made = bw.build_impls("w4a16_g128_zp", n, k, fmt, w, mod, ("qcompile", "read_floor"), act)
        qweight = made["qcompile"].args[1][0]  # the decode kernel's own prepared weight
        x = torch.randn(1, k, device="cuda", dtype=act)
        res = {"qcompile": time_graph(lambda: made["qcompile"](x)),
               "read_floor": time_graph(lambda: made["read_floor"](x))}
        sink = torch.zeros(64, dtype=torch.int32, device="cuda")
        for name, loads, variant in VARIANTS:
            ring = ring_bytes(warps, loads, variant)
            smem = max(0, SMEM_PER_SM // ctas - SMEM_RESERVED - ring)  # with the ring: ctas an SM

            def call(loads=loads, variant=variant, smem=smem):
                rc = lib.qc_walk_probe(qweight.data_ptr(), n, k, sink.data_ptr(), loads, variant,
                                       warps, smem, torch.cuda.current_stream().cuda_stream)
                if rc:
                    raise RuntimeError(f"qc_walk_probe failed ({rc})")
            res[f"probe[{name}]"] = time_graph(call)
        note = f"decode launch: 32-row CTAs of {warps} warps, {ctas} an SM"
        with open(args.out, "a") as f:
            for impl, us in res.items():
                f.write(json.dumps(dict(meta, n=n, k=k, impl=impl, median_us=round(us, 2), note=note)) + "\n")
        print(f"{n}x{k}: " + "  ".join(f"{i} {u:.1f}" for i, u in res.items()), flush=True)


if __name__ == "__main__":
    main()
