"""Weight-only quantized linear on the GPU: qcompile's CUTLASS mixed-input GEMM against
bf16 cuBLAS, PyTorch's tinygemm int4 kernel and Inductor on the plain dequant + linear.

Patterns (bf16 activations, random data):
  w4a16_g128_zp  unsigned int4 [N, K] as two nibbles per byte, (q - z) * s, groups of 128
  w8a16_pc       int8 [N, K], per-channel scale s[N]
Timing follows shared/BASELINES.md: one process; every implementation captured in a CUDA
graph and graph.replay timed by triton.testing.do_bench (which flushes the L2 before each
call, so weights come from HBM); medians in microseconds.

Appends one JSON line per cell to benchmarks/results/bench_w4a16.jsonl (or --out) and
prints a table with the ratio to cublas_bf16. Extra rows qcompile_dp / qcompile_streamk
force the data-parallel / stream-K decomposition where the heuristic chose split-K, to
show what splitting K buys at decode sizes; --decode adds a row per launch shape of the
decode kernel (M <= 32) on each family's layout. `read_floor` is no GEMM: a kernel that only
reads the quantized weight's bytes (int4: the packed nibbles; scales and zeros, 1/16 more,
not counted), timed the same way: what streaming the weight costs under this timing.

  python benchmarks/bench_w4a16.py [--quick] [--out FILE] [--impls a,b] [--ms 1,16] [--decode]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, read_floor, time_graph  # noqa: E402

PATTERNS = ("w4a16_g128_zp", "w8a16_pc")
IMPLS = ("qcompile", "qcompile_sm80", "cublas_bf16", "tinygemm", "inductor",
         "inductor_max_autotune", "read_floor")
MS = (1, 16, 64, 256, 2048)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
GROUP = 128
DT = torch.bfloat16


class W4Dequant(torch.nn.Module):
    """The plain pattern Inductor sees: unpack nibbles, (q - z) * s per group, linear."""

    def __init__(self, packed, scales, zeros):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def forward(self, x):
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        q = torch.stack((self.packed & 0xF, self.packed >> 4), dim=-1).reshape(n, k // GROUP, GROUP)
        w = (q.to(DT) - self.zeros[..., None]) * self.scales[..., None]
        return F.linear(x, w.reshape(n, k))


class W8Dequant(torch.nn.Module):
    def __init__(self, q, scales):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)

    def forward(self, x):
        return F.linear(x, self.q.to(DT) * self.scales[:, None])


def make_weights(pattern: str, n: int, k: int):
    """(format dict for qcompile, the dequantized bf16 weight, the eager module)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    if pattern == "w4a16_g128_zp":
        q = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.int16)
        q = q.to(torch.uint8)
        s = (torch.rand(n, k // GROUP, device="cuda", generator=g) * 0.02 + 0.001).to(DT)
        z = torch.randint(0, 16, (n, k // GROUP), device="cuda", generator=g).to(DT)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        mod = W4Dequant(packed, s, z)
        fmt = dict(q=q, s=s, z=z, bits=4, signed=False, group=GROUP, zero_mode="sub")
    else:
        q = torch.randint(-128, 128, (n, k), device="cuda", generator=g, dtype=torch.int16)
        q = q.to(torch.int8)
        s = (torch.rand(n, device="cuda", generator=g) * 0.02 + 0.001).to(DT)
        mod = W8Dequant(q, s)
        fmt = dict(q=q, s=s[:, None], z=None, bits=8, signed=True, group=k, zero_mode="none")
    with torch.no_grad():
        w = _dequant(mod, pattern)
    return fmt, w, mod


def _dequant(mod, pattern):
    if pattern == "w4a16_g128_zp":
        n, k = mod.packed.shape[0], mod.packed.shape[1] * 2
        q = torch.stack((mod.packed & 0xF, mod.packed >> 4), dim=-1).reshape(n, k // GROUP, GROUP)
        return ((q.to(DT) - mod.zeros[..., None]) * mod.scales[..., None]).reshape(n, k)
    return mod.q.to(DT) * mod.scales[:, None]


def _run_family_choice(fam, args, x, choice=None):
    return fam.mixed_gemm_cuda(x, *args, config=choice)


def build_impls(pattern, n, k, fmt, w, mod, impls):
    """name -> (x -> out) factories per impl for one weight; compiled modules reused over M."""
    from qcompile.kernels import mixed_gemm as mg
    from qcompile.kernels import mixed_gemm_sm80 as m80

    made = {}
    # the Hopper family, and the Ampere-class one (sm_80 code, which also runs on Hopper)
    for name, fam in (("qcompile", mg), ("qcompile_sm80", m80)):
        if name not in impls:
            continue
        layout = fam.select_layout(fmt["bits"], fmt["signed"], fmt["group"], fmt["zero_mode"],
                                   n, k, DT, "cuda")
        if layout is None:
            print(f"  {name}: no layout for {pattern} {n}x{k}", flush=True)
            continue
        prepared = fam.prepare_weight(fmt["q"], fmt["s"], fmt["z"], fmt["bits"], fmt["signed"],
                                      fmt["group"], fmt["zero_mode"], layout, DT)
        args = (*prepared, None, fmt["bits"], fmt["signed"], fmt["group"], fmt["zero_mode"],
                layout)
        made[name] = functools.partial(_run_family_choice, fam, args)
        made[f"_layout_{name}"] = layout
        if fam is mg:
            made["_mode"] = mg._MODE_OF_LAYOUT[layout]
    if "cublas_bf16" in impls:
        made["cublas_bf16"] = lambda x: F.linear(x, w)
    if "read_floor" in impls:
        floor = read_floor(mod.packed if fmt["bits"] == 4 else fmt["q"])
        made["read_floor"] = lambda x: floor()
    if "tinygemm" in impls and fmt["bits"] == 4:
        try:
            q = fmt["q"].to(torch.int32)
            packed = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
            wt = torch._convert_weight_to_int4pack(packed, 8)
            # tinygemm dequantizes (q - 8) * s + zp: zp = (8 - z) * s gives (q - z) * s
            s = fmt["s"].t()
            zp = (8 - fmt["z"].t()) * s
            sz = torch.stack((s, zp), dim=-1).contiguous().to(DT)
            made["tinygemm"] = lambda x: torch._weight_int4pack_mm(x, wt, GROUP, sz)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  tinygemm unavailable: {type(e).__name__}: {e}", flush=True)
    if "inductor" in impls:
        made["inductor"] = torch.compile(mod, dynamic=False)
    if "inductor_max_autotune" in impls:
        made["inductor_max_autotune"] = torch.compile(mod, dynamic=False,
                                                      mode="max-autotune-no-cudagraphs")
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="M in {1,16,256,2048}, shapes 4096x4096 and 14336x4096, no max-autotune")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_w4a16.jsonl"))
    ap.add_argument("--impls", default=None, help="comma list, default all")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--ms", default=None)
    ap.add_argument("--shapes", default=None, help="e.g. 14336x4096,4096x4096 (N x K)")
    ap.add_argument("--no-variants", action="store_true", help="skip qcompile_dp/_streamk rows")
    ap.add_argument("--explore", action="store_true",
                    help="also time every qcompile config and decomposition (impl 'qcompile[...]')")
    ap.add_argument("--decode", action="store_true",
                    help="also time every decode-kernel launch shape (M <= 32) on each family's "
                         "layout (impl 'qcompile[decode...]' / 'qcompile_sm80[decode...]')")
    ap.add_argument("--experimental", action="store_true",
                    help="with --explore, include mixed_gemm.EXPERIMENTAL_CONFIGS (built here)")
    args = ap.parse_args(argv)

    from qcompile.kernels import mixed_gemm as mg
    from qcompile.kernels import mixed_gemm_sm80 as m80

    impls = tuple(args.impls.split(",")) if args.impls else (
        tuple(i for i in IMPLS if i != "inductor_max_autotune") if args.quick else IMPLS)
    ms = (tuple(int(m) for m in args.ms.split(",")) if args.ms
          else ((1, 16, 256, 2048) if args.quick else MS))
    shapes = (tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
              if args.shapes else (SHAPES[:2] if args.quick else SHAPES))
    meta = dict(bench="bench_w4a16", device=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([Path(sys.executable).name, *sys.argv]))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mg.build_all(mg.CONFIGS + (mg.EXPERIMENTAL_CONFIGS if args.experimental else ()))
    results: dict[tuple, float] = {}
    torch.manual_seed(0)
    with out_path.open("a") as f, torch.no_grad():
        for pattern in args.patterns.split(","):
            for n, k in shapes:
                fmt, w, mod = make_weights(pattern, n, k)
                made = build_impls(pattern, n, k, fmt, w, mod, impls)
                mode = made.pop("_mode", None)
                layouts = {name[len("_layout_"):]: made.pop(name)
                           for name in [n_ for n_ in made if n_.startswith("_layout_")]}
                for m in ms:
                    x = torch.randn(m, k, device="cuda").to(DT)
                    cells = [(name, fn, None) for name, fn in made.items()]
                    if "qcompile" in made and not args.no_variants:
                        ch = mg.choose_config(m, n, k, "bf16", fmt["bits"], mode)
                        if ch.decomposition == mg.DECOMP_SPLIT_K:
                            cells.append(("qcompile_dp", made["qcompile"],
                                          mg.Choice(ch.config, mg.DECOMP_DATA_PARALLEL, 1)))
                        if ch.config.streamk and m <= 64:
                            cells.append(("qcompile_streamk", made["qcompile"],
                                          mg.Choice(ch.config, mg.DECOMP_STREAM_K, 1)))
                        if ch.decomposition == mg.DECOMP_STREAM_K and m > 64:
                            # the data-parallel build of the same tile, for the fill rule
                            dp = dataclasses.replace(ch.config, streamk=False)
                            cells.append(("qcompile_dp", made["qcompile"], mg.Choice(dp)))
                    if "qcompile" in made and args.explore:
                        cells += [(f"qcompile[{mg.config_name(c.config)}/{_DECOMP[c.decomposition]}"
                                   f"{c.splits if c.splits > 1 else ''}]", made["qcompile"], c)
                                  for c in _all_choices(mg, m, n, k, fmt["bits"], mode,
                                                        args.experimental)]
                        # the heuristic's kernel once more after them: how far the clock
                        # drifted over the cell (up to 6% at M = 2048, benchmarks/NOTES.md)
                        cells.append(("qcompile_again", made["qcompile"], None))
                        if "cublas_bf16" in made:
                            cells.append(("cublas_bf16_again", made["cublas_bf16"], None))
                    if args.decode:
                        for fam_name, fam in (("qcompile", mg), ("qcompile_sm80", m80)):
                            if fam_name not in made:
                                continue
                            cands = fam.candidates(m, n, k, "bf16", fmt["bits"], fmt["group"],
                                                   layouts[fam_name], 132)
                            cells += [(f"{fam_name}[{c}]", made[fam_name], c)
                                      for c in cands if c.startswith("decode.")]
                    for name, fn, choice in cells:
                        if choice is not None:
                            call = functools.partial(fn, x, choice)
                        else:
                            call = functools.partial(fn, x)
                        extra = {}
                        try:
                            if name == "qcompile":
                                ch = mg.heuristic_choice(m, n, k, "bf16", fmt["bits"], mode,
                                                         132, fmt["group"])
                                extra = dict(config=mg.choice_name(ch))
                            if name.startswith("qcompile"):  # every qcompile row checks numbers
                                ref = F.linear(x, w).double()
                                err = ((call().double() - ref).norm() / ref.norm()).item()
                                extra["rel_err_vs_bf16"] = err
                                if not err < 1e-2:
                                    print(f"  WARNING {name} {pattern} {n}x{k} M={m}: "
                                          f"rel err {err:.3e}")
                            us = time_graph(call)
                        except Exception as e:  # noqa: BLE001 - one failing impl must not stop all
                            print(f"  {name} {pattern} {n}x{k} M={m} failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}", flush=True)
                            continue
                        results[(pattern, n, k, name, m)] = us
                        rec = dict(meta, pattern=pattern, n=n, k=k, m=m, impl=name,
                                   median_us=round(us, 2), **extra)
                        f.write(json.dumps(rec) + "\n")
                        f.flush()
                        print(f"  {pattern} {n}x{k} M={m} {name}: {us:.1f} us", flush=True)
                del made, mod, w, fmt
                torch.cuda.empty_cache()
    _table(results, ms)
    return 0


_DECOMP = {0: "heur", 1: "dp", 2: "splitk", 3: "streamk"}


def _all_choices(mg, m, n, k, bits, mode, experimental=False):
    """Every config of the family, with each decomposition worth timing at this size."""
    out = []
    for cfg in mg.CONFIGS + (mg.EXPERIMENTAL_CONFIGS if experimental else ()):
        if (cfg.act, cfg.bits, cfg.mode) != ("bf16", bits, mode):
            continue
        if not ((cfg.tile_n <= 64 and m <= 256) or (cfg.tile_n >= 64 and m >= 64)):
            continue  # hopeless pairings (16-token tiles at prefill, wide tiles at decode)
        out.append(mg.Choice(cfg, mg.DECOMP_DATA_PARALLEL, 1))
        if cfg.streamk:
            # every split count from 2 up to the one that fills the SMs: more splits fill
            # more SMs but chain more partial sums through the workspace
            tiles = -(-n // cfg.tile_m) * -(-m // cfg.tile_n)
            most = min(132 // tiles, k // cfg.tile_k // 8, 16)
            out += [mg.Choice(cfg, mg.DECOMP_SPLIT_K, s) for s in range(2, most + 1)]
            out.append(mg.Choice(cfg, mg.DECOMP_STREAM_K, 1))
            if tiles > 132:
                # more tiles than SMs: the last wave part full; CUTLASS's own mix of
                # data-parallel waves and a stream-K remainder, and halves of K (split-K 2)
                # that quantise into waves twice as finely
                out += [mg.Choice(cfg, mg.DECOMP_HEURISTIC, 1), mg.Choice(cfg, mg.DECOMP_SPLIT_K, 2)]
    return out


def _table(results, ms):
    rows = sorted({(p, n, k, i) for (p, n, k, i, _) in results},
                  key=lambda r: (r[0], r[1], r[2], r[3] != "qcompile", r[3]))
    w = max([len(r[3]) for r in rows] + [8])
    head = "".join(f"{'M=' + str(m):>16}" for m in ms)
    print(f"\n{'pattern':15} {'N x K':11} {'impl':{w}}" + head)
    for p, n, k, impl in rows:
        line = f"{p:15} {f'{n}x{k}':11} {impl:{w}}"
        for m in ms:
            us = results.get((p, n, k, impl, m))
            base = results.get((p, n, k, "cublas_bf16", m))
            if us is None:
                line += f"{'-':>16}"
            elif base:
                line += f"{us:9.1f} ({base / us:4.2f}x)"[-16:].rjust(16)
            else:
                line += f"{us:16.1f}"
        print(line)
    print("(us, median of graph replays with L2 flushed; (r x) = cublas_bf16 time / this time)")


if __name__ == "__main__":
    sys.exit(main())
