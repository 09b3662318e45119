"""A/B of sources of the decode kernel (``csrc/mixed_gemm_decode.cu``) and the lookup-table GEMM in one process.

The libraries of a baseline source (``--base DIR``: a copy of ``qcompile/kernels/csrc`` at
the baseline, e.g. ``git archive <commit> qcompile/kernels/csrc``), of this tree's source
and of any other (``--variant NAME=DIR``, repeatable) are loaded side by side (the build
cache keys each by its source, so all sit in ``$QCOMPILE_CACHE_DIR``; missing ones are
built), and each cell is timed for every variant in interleaved rounds: the decode kernel
on the affine patterns (its heuristic's launch shape, and with ``--shapes-all`` every one,
``qcompile[<launch>]``; never a CUTLASS GEMM, whatever the token count) and the
lookup-table decode kernel (``nf4_b64``, ``qcompile[decode]``; with ``--lut-paths
decode,gemm`` also the lookup-table GEMM, ``qcompile[gemm]``, its heuristic's build for each
cell loaded per variant), the read floor beside them.
Every variant's output is compared with the baseline's bit for bit (the A/B of a change
meant to keep the results) and the script fails if one differs.

Rows (``--out``, default ``benchmarks/results/decode_ab.jsonl``): the bench_w4a16 fields
plus ``variant`` (``base`` / ``tree`` / the names given), ``round`` and ``base_commit``;
docs/performance.md shows their medians per variant.

  python benchmarks/ab_decode.py --base .gpu/base_csrc --base-commit 5842117 \\
      [--variant NAME=DIR] [--patterns w4a16_g128_zp,nf4_b64] [--ms 1,16] [--act bf16,fp16]
      [--shapes 14336x4096,...] [--shapes-all] [--lut-paths decode,gemm] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, time_graph  # noqa: E402
from bench_w4a16 import ACTS, build_impls, make_weights  # noqa: E402

SHAPES = ((4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 4096))


def _load_variant(csrc: Path, patterns: list[str], acts: list[str], gemm_cells=()) -> dict:
    """The decode libraries the cells of these patterns and activation types use, built from
    the source in ``csrc``, and the lookup-table GEMM builds (NF4) the heuristic picks for
    ``gemm_cells`` ((m, n, k) each):
    {"decode": {build: lib}, "lut": {act: lib}, "lut_gemm": {(config, bits): lib}}."""
    from qcompile.kernels import build, lut_gemm
    from qcompile.kernels import mixed_gemm_decode as decode
    from qcompile.lowering.lookup_table import NF4_VALUES
    old = build.CSRC_DIR
    build.CSRC_DIR = csrc
    decode._libs.clear()
    lut_gemm._libs.clear()
    lut_gemm._gemm_libs.clear()
    try:
        for act in acts:
            if any(p.startswith("w4") for p in patterns):
                decode._lib(decode.DecodeBuild(act, 4, decode.LAYOUT_SM90, decode.MODE_GROUPZERO))
            if "w8a16_pc" in patterns:
                decode._lib(decode.DecodeBuild(act, 8, decode.LAYOUT_SM90, decode.MODE_ROWSCALE))
            if "nf4_b64" in patterns:
                lut_gemm._lib(act)
                bits = lut_gemm.table_bits(torch.tensor(NF4_VALUES), ACTS[act])
                for m, n, k in gemm_cells:
                    lut_gemm._gemm_lib(lut_gemm.gemm_choice(m, n, k, act, 64).config, bits)
        return {"decode": dict(decode._libs), "lut": dict(lut_gemm._libs),
                "lut_gemm": dict(lut_gemm._gemm_libs)}
    finally:
        build.CSRC_DIR = old


def _install(libs: dict) -> None:
    from qcompile.kernels import lut_gemm
    from qcompile.kernels import mixed_gemm_decode as decode
    decode._libs.clear()
    decode._libs.update(libs["decode"])
    lut_gemm._libs.clear()
    lut_gemm._libs.update(libs["lut"])
    lut_gemm._gemm_libs.clear()
    lut_gemm._gemm_libs.update(libs["lut_gemm"])


def _check_installed(libs: dict) -> None:
    """A call that loaded a library the variant lacks ran this tree's: fail rather than time it."""
    from qcompile.kernels import lut_gemm
    from qcompile.kernels import mixed_gemm_decode as decode
    if (set(decode._libs) != set(libs["decode"]) or set(lut_gemm._libs) != set(libs["lut"])
            or set(lut_gemm._gemm_libs) != set(libs["lut_gemm"])):
        raise RuntimeError("a cell used a library its variant was not loaded with")


def _impls(pattern, n, k, fmt, w, mod, act) -> dict:
    """``qcompile`` (x, launch) -> out and ``read_floor``: the weight prepared in the decode
    kernel's layout directly (the families' own setup builds their GEMM libraries, which the
    decode kernel does not need: the affine sm90 layout, the lookup-table pairs layout)."""
    from qcompile.kernels import lut_gemm
    from qcompile.kernels import mixed_gemm as mg
    made = build_impls(pattern, n, k, fmt, w, mod, ["read_floor"], act)
    if fmt.get("lut"):
        prepared = lut_gemm.prepare(fmt["codes"], fmt["table"], fmt["s"])
        config = lut_gemm._config_of(lut_gemm._ACTS[act], lut_gemm.table_bits(fmt["table"], act))
        gemm_scales = lut_gemm.gemm_scales_of(prepared[2], act)
        made["qcompile"] = lambda x, path: lut_gemm.run(x, *prepared, None, fmt["group"],
                                                        "float32", path, config=config,
                                                        gemm_scales=gemm_scales)
        return made
    layout = mg.LAYOUT_ROWSCALE if fmt["bits"] == 8 else mg.LAYOUT_GROUPZERO
    prepared = mg.prepare_weight(fmt["q"], fmt["s"], fmt["z"], fmt["bits"], fmt["signed"],
                                 fmt["group"], fmt["zero_mode"], layout, act)
    args = (*prepared, None, fmt["bits"], fmt["signed"], fmt["group"], fmt["zero_mode"], layout)
    made["qcompile"] = lambda x, launch: mg.mixed_gemm_cuda(x, *args, config=launch)
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="csrc directory of the baseline source")
    ap.add_argument("--base-commit", default="unknown", help="the baseline's commit (rows)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=DIR: one more csrc directory to time beside the two")
    ap.add_argument("--patterns", default="w4a16_g128_zp,nf4_b64")
    ap.add_argument("--act", default="bf16,fp16")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--shapes", default=None, help="N x K list, default the five Llama shapes")
    ap.add_argument("--shapes-all", action="store_true",
                    help="also every decode launch shape (affine int4 bf16)")
    ap.add_argument("--lut-paths", default="decode",
                    help="nf4_b64 cells: 'decode', 'gemm' (the lookup-table GEMM) or both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_ab.jsonl"))
    args = ap.parse_args(argv)

    from qcompile.kernels import build
    from qcompile.kernels import mixed_gemm_decode as decode
    patterns, acts = args.patterns.split(","), args.act.split(",")
    lut_paths = args.lut_paths.split(",")
    if not set(lut_paths) <= {"decode", "gemm"}:
        ap.error(f"--lut-paths takes decode and gemm, got {args.lut_paths!r}")
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
              if args.shapes else SHAPES)
    ms = [int(v) for v in args.ms.split(",")]
    gemm_cells = [(m, n, k) for n, k in shapes for m in ms] if "gemm" in lut_paths else []
    variants = {"base": _load_variant(Path(args.base).resolve(), patterns, acts, gemm_cells),
                "tree": _load_variant(build.CSRC_DIR, patterns, acts, gemm_cells)}
    for spec in args.variant:
        name, _, path = spec.partition("=")
        variants[name] = _load_variant(Path(path).resolve(), patterns, acts, gemm_cells)
    meta = dict(bench="decode_ab", device=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=commit(), base_commit=args.base_commit, flush="clean",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([Path(sys.executable).name, *sys.argv]))
    mismatches = 0
    with open(args.out, "a") as f, torch.no_grad():
        for pattern in patterns:
            for act_name in acts:
                act = ACTS[act_name]
                for n, k in shapes:
                    fmt, w, mod = make_weights(pattern, n, k, act)
                    made = _impls(pattern, n, k, fmt, w, mod, act)
                    for m in ms:
                        x = torch.randn(m, k, device="cuda").to(act)
                        if fmt.get("lut"):  # the lookup-table decode kernel / GEMM, own picks
                            cells = [(f"qcompile[{p}]", p) for p in lut_paths]
                        else:  # the decode kernel's heuristic launch (never a CUTLASS GEMM)
                            pick = decode.heuristic(m, n, k, group=fmt["group"]).name
                            cells = [(f"qcompile[{pick}]", pick)]
                            if args.shapes_all and act_name == "bf16":
                                cells += [(f"qcompile[{c}]", c) for c in decode.candidates(
                                    m, n, k, group=fmt["group"])
                                    if c.startswith("decode.") and c != pick]
                        for name, choice in cells:
                            fn = made["qcompile"]
                            call = lambda fn=fn, c=choice: fn(x, c)  # noqa: E731
                            outs = {}
                            for v, libs in variants.items():
                                _install(libs)
                                outs[v] = call().clone()
                                _check_installed(libs)
                            for v, out in outs.items():
                                if not torch.equal(outs["base"], out):
                                    mismatches += 1
                                    print(f"  MISMATCH {v} {pattern} {act_name} {n}x{k} M={m} {name}")
                            for rnd in range(args.rounds):
                                for v, libs in variants.items():
                                    _install(libs)
                                    us = time_graph(call)
                                    _check_installed(libs)
                                    f.write(json.dumps(dict(meta, pattern=pattern, act=act_name,
                                                            n=n, k=k, m=m, impl=name, variant=v,
                                                            round=rnd, median_us=us)) + "\n")
                                    print(f"  {pattern} {act_name} {n}x{k} M={m} {name} {v} "
                                          f"r{rnd}: {us:.2f} us", flush=True)
                        floor = time_graph(lambda: made["read_floor"](x))
                        f.write(json.dumps(dict(meta, pattern=pattern, act=act_name, n=n, k=k,
                                                m=m, impl="read_floor", median_us=floor)) + "\n")
                        f.flush()
                    del made, mod, w, fmt
                    torch.cuda.empty_cache()
    print(f"{mismatches} mismatches")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
