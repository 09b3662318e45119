"""Weight-only quantized linear on the GPU: qcompile's CUTLASS mixed-input GEMM against
bf16 cuBLAS, PyTorch's tinygemm int4 kernel and Inductor on the plain dequant + linear.

Patterns (random data; activations bf16, or fp16 with --act fp16):
  w4a16_g128_zp   unsigned int4 [N, K] as two nibbles per byte, (q - z) * s, groups of 128
  w4a16_g128_sym  signed int4 [-8, 7] as two nibbles per byte, q * s, groups of 128, no zeros
  w8a16_pc        int8 [N, K], per-channel scale s[N]
  nf4_b64         NF4 codes [N, K] (two per byte), table[c] * absmax, float32 absmax per 64
                  along K (bitsandbytes' Linear4bit default); qcompile runs qcompile::lut_gemm
Scales and zeros are in the activation dtype; with fp16 activations cuBLAS (impl name still
`cublas_bf16`) runs fp16 x fp16 on the dequantized fp16 weight and qcompile takes and returns
fp16; those rows carry "act": "fp16" (rows without "act" are bf16).

Timing follows shared/BASELINES.md: one process; every implementation captured in a CUDA
graph and graph.replay timed by triton.testing.do_bench, the L2 flushed before each call by
reading a 256 MB buffer (--flush clean, the default: weights come from HBM and the L2 holds
clean lines) or by do_bench's own zero-fill (--flush zero, how rows without "flush" were
timed); medians in microseconds. Every row records "flush".

Appends one JSON line per cell to benchmarks/results/bench_w4a16.jsonl (or --out) and
prints a table with the ratio to cublas_bf16, then one of cuBLAS / qcompile and, for
M <= 16, qcompile / read_floor. `--grid issue25` is the preset of issue 25: N x K in
4096x4096, 14336x4096, 4096x14336, 28672x4096, M in 1..2048, the three affine patterns, bf16
and fp16, impls qcompile, cublas_bf16, read_floor, marlin (no qcompile_dp/_streamk rows);
`--grid issue27` NF4 beside int4 g128+zeros on 4096x4096 and 14336x4096, bf16 (with `--decode`
also each lookup-table path at every M, each lookup of the decode kernel up to 64 tokens,
and `qcompile[gemm.convert]`: the GEMM converting its float32 scales at every call, as it did
before the op took them in the activation type). Flags given beside a grid override its parts.
`marlin` (fp16 cells only) is IST-DASLab's kernel built from source (importable as
`marlin`): the symmetric cells exactly, the zeros cells a symmetric stand-in of the same
bytes (its rows say "weights"). `bitsandbytes` (NF4 cells, in the issue27 grid) is
bitsandbytes' own `matmul_4bit` where its wheel loads. Extra rows qcompile_dp /
qcompile_streamk force the data-parallel / stream-K decomposition where the heuristic chose
split-K, to show what splitting K buys at decode sizes; --decode adds a row per launch shape of the
decode kernel (M <= 32) on each family's layout. `read_floor` is no GEMM: a kernel that only
reads the quantized weight's bytes (int4: the packed nibbles; scales and zeros, 1/16 more,
not counted), timed the same way: what streaming the weight costs under this timing.

  python benchmarks/bench_w4a16.py [--quick | --grid issue25] [--out FILE] [--impls a,b]
      [--ms 1,16] [--act bf16,fp16] [--flush clean|zero] [--decode]
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
from bench_common import FLUSHES, commit, read_floor, time_graph  # noqa: E402

PATTERNS = ("w4a16_g128_zp", "w4a16_g128_sym", "w8a16_pc", "nf4_b64")
LUT_BLOCK = 64
IMPLS = ("qcompile", "qcompile_sm80", "cublas_bf16", "tinygemm", "inductor",
         "inductor_max_autotune", "read_floor", "marlin", "bitsandbytes")
MS = (1, 16, 64, 256, 2048)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
GROUP = 128
DT = torch.bfloat16  # the default activation dtype
ACTS = {"bf16": torch.bfloat16, "fp16": torch.float16}
ACT_NAME = {v: k for k, v in ACTS.items()}
GRIDS = {
    # issue 25: the decode and prefill sizes of Llama-3-8B/70B layers, both activation dtypes
    "issue25": dict(shapes=((4096, 4096), (14336, 4096), (4096, 14336), (28672, 4096)),
                    ms=(1, 16, 64, 256, 2048),
                    patterns=("w4a16_g128_zp", "w4a16_g128_sym", "w8a16_pc"),
                    acts=("bf16", "fp16"),
                    impls=("qcompile", "cublas_bf16", "read_floor", "marlin"),
                    no_variants=True),
    # issue 27: NF4 beside the affine int4 cells it is held to, same process
    "issue27": dict(shapes=((4096, 4096), (14336, 4096)), ms=(1, 16, 64, 256, 2048),
                    patterns=("nf4_b64", "w4a16_g128_zp"), acts=("bf16",),
                    impls=("qcompile", "cublas_bf16", "read_floor", "bitsandbytes"),
                    no_variants=True),
}


class NF4Dequant(torch.nn.Module):
    """bitsandbytes' layout written out: codes two per byte, table[c] * absmax per block."""

    def __init__(self, packed, table, absmax, act):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("table", table)
        self.register_buffer("absmax", absmax)
        self.act = act

    def weight(self):
        c = torch.stack((self.packed & 0xF, self.packed >> 4), dim=-1).reshape(
            self.packed.shape[0], -1).long()
        n, k = c.shape
        w = self.table[c].reshape(n, k // LUT_BLOCK, LUT_BLOCK) * self.absmax[..., None]
        return w.reshape(n, k).to(self.act)

    def forward(self, x):
        return F.linear(x, self.weight())


class W4Dequant(torch.nn.Module):
    """The plain pattern Inductor sees: unpack nibbles, (q - z) * s per group, linear
    (in the scales' dtype)."""

    def __init__(self, packed, scales, zeros):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def weight(self):
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        q = torch.stack((self.packed & 0xF, self.packed >> 4), dim=-1).reshape(n, k // GROUP, GROUP)
        w = (q.to(self.scales.dtype) - self.zeros[..., None]) * self.scales[..., None]
        return w.reshape(n, k)

    def forward(self, x):
        return F.linear(x, self.weight())


class W4SymDequant(torch.nn.Module):
    """Signed int4 (two's-complement nibbles, low nibble first), q * s per group, linear."""

    def __init__(self, packed, scales):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    def weight(self):
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        b = self.packed.view(torch.int8)
        lo = (b << 4) >> 4  # arithmetic shifts on int8 sign-extend each nibble
        hi = b >> 4
        q = torch.stack((lo, hi), dim=-1).reshape(n, k // GROUP, GROUP)
        return (q.to(self.scales.dtype) * self.scales[..., None]).reshape(n, k)

    def forward(self, x):
        return F.linear(x, self.weight())


class W8Dequant(torch.nn.Module):
    def __init__(self, q, scales):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)

    def weight(self):
        return self.q.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x):
        return F.linear(x, self.weight())


def make_weights(pattern: str, n: int, k: int, act: torch.dtype = DT, device="cuda"):
    """(format dict for qcompile, the dequantized weight in the activation dtype ``act``, the
    eager module). Scales and zeros are in ``act``; the integers do not depend on it."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; one of {PATTERNS}")
    g = torch.Generator(device=device).manual_seed(0)
    if pattern == "w4a16_g128_zp":
        q = torch.randint(0, 16, (n, k), device=device, generator=g, dtype=torch.int16)
        q = q.to(torch.uint8)
        s = (torch.rand(n, k // GROUP, device=device, generator=g) * 0.02 + 0.001).to(act)
        z = torch.randint(0, 16, (n, k // GROUP), device=device, generator=g).to(act)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        mod = W4Dequant(packed, s, z)
        fmt = dict(q=q, s=s, z=z, bits=4, signed=False, group=GROUP, zero_mode="sub")
    elif pattern == "w4a16_g128_sym":
        q = torch.randint(-8, 8, (n, k), device=device, generator=g, dtype=torch.int16)
        s = (torch.rand(n, k // GROUP, device=device, generator=g) * 0.02 + 0.001).to(act)
        u = (q & 0xF).to(torch.uint8)  # two's-complement nibbles
        packed = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
        q = q.to(torch.int8)
        mod = W4SymDequant(packed, s)
        fmt = dict(q=q, s=s, z=None, bits=4, signed=True, group=GROUP, zero_mode="none")
    elif pattern == "nf4_b64":
        from qcompile.lowering.lookup_table import code_table
        c = torch.randint(0, 16, (n, k), device=device, generator=g, dtype=torch.int16)
        c = c.to(torch.uint8)
        absmax = torch.rand(n, k // LUT_BLOCK, device=device, generator=g) * 0.02 + 0.01
        packed = (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()
        table = code_table("nf4").to(device)
        mod = NF4Dequant(packed, table, absmax, act)
        fmt = dict(codes=c, table=table, s=absmax, bits=4, group=LUT_BLOCK, lut=True)
    else:
        q = torch.randint(-128, 128, (n, k), device=device, generator=g, dtype=torch.int16)
        q = q.to(torch.int8)
        s = (torch.rand(n, device=device, generator=g) * 0.02 + 0.001).to(act)
        mod = W8Dequant(q, s)
        fmt = dict(q=q, s=s[:, None], z=None, bits=8, signed=True, group=k, zero_mode="none")
    with torch.no_grad():
        w = mod.weight()
    return fmt, w, mod


def _run_family_choice(fam, args, x, choice=None):
    return fam.mixed_gemm_cuda(x, *args, config=choice)


def build_impls(pattern, n, k, fmt, w, mod, impls, act=DT):
    """name -> (x -> out) factories per impl for one weight (activations of dtype ``act``);
    compiled modules reused over M."""
    from qcompile.kernels import mixed_gemm as mg
    from qcompile.kernels import mixed_gemm_sm80 as m80

    made = {}
    if fmt.get("lut") and "qcompile" in impls:  # the lookup-table kernels (one family)
        from qcompile.kernels import lut_gemm
        lut_gemm.load(act)
        prepared = lut_gemm.prepare(fmt["codes"], fmt["table"], fmt["s"])
        # the op's config as the rewrite sets it (the GEMM where GEMM_TABLES names NF4), and
        # the GEMM's own for its forced rows wherever it runs
        from qcompile.kernels import GEMM_TABLES
        dev = fmt["codes"].device
        fmt["gemm_config"] = ("" if lut_gemm.gemm_supported(dev, n, k, fmt["group"], act) else
                              lut_gemm.gemm_config(fmt["table"], act))
        fmt["config"] = fmt["gemm_config"] if "nf4" in GEMM_TABLES else ""
        # the GEMM's scales in the activation type, made once as the rewrite makes them
        # (kernels.LUT_GEMM_ACT_SCALES); "gemm.convert" rows: the GEMM converting them a call
        from qcompile.kernels import LUT_GEMM_ACT_SCALES
        act_scales = (lut_gemm.gemm_scales_of(prepared[2], act)
                      if fmt["gemm_config"] and LUT_GEMM_ACT_SCALES else None)
        bits = lut_gemm.table_bits(fmt["table"], act)  # here: it reads the table on the host

        def lut_call(x, path=None):
            if isinstance(path, mg.Choice):  # one GEMM build and split, forced (--explore)
                return lut_gemm._run_gemm(x, prepared[0], prepared[2], None, fmt["group"], bits,
                                          path, act_scales=act_scales)
            if path == "gemm.convert":
                return lut_gemm.run(x, *prepared, None, fmt["group"], "float32", "gemm",
                                    config=fmt["gemm_config"])
            if path not in ("pairs", "single"):
                return lut_gemm.run(x, *prepared, None, fmt["group"], "float32", path,
                                    config=fmt["gemm_config" if path == "gemm" else "config"],
                                    gemm_scales=act_scales)
            # the decode kernel's two lookups: the 256-pair table or the 16-value one
            old, lut_gemm.PAIR_TABLE = lut_gemm.PAIR_TABLE, path == "pairs"
            try:
                return lut_gemm.run(x, *prepared, None, fmt["group"], "float32", "decode")
            finally:
                lut_gemm.PAIR_TABLE = old
        made["qcompile"] = lut_call
    # the Hopper family, and the Ampere-class one (sm_80 code, which also runs on Hopper)
    for name, fam in (("qcompile", mg), ("qcompile_sm80", m80)):
        if name not in impls or fmt.get("lut"):
            continue
        layout = fam.select_layout(fmt["bits"], fmt["signed"], fmt["group"], fmt["zero_mode"],
                                   n, k, act, "cuda")
        if layout is None:
            print(f"  {name}: no layout for {pattern} {ACT_NAME[act]} {n}x{k}", flush=True)
            continue
        prepared = fam.prepare_weight(fmt["q"], fmt["s"], fmt["z"], fmt["bits"], fmt["signed"],
                                      fmt["group"], fmt["zero_mode"], layout, act)
        args = (*prepared, None, fmt["bits"], fmt["signed"], fmt["group"], fmt["zero_mode"],
                layout)
        made[name] = functools.partial(_run_family_choice, fam, args)
        made[f"_layout_{name}"] = layout
        if fam is mg:
            made["_mode"] = mg._MODE_OF_LAYOUT[layout]
    if "marlin" in impls and fmt["bits"] == 4 and not fmt.get("lut"):
        _add_marlin(made, fmt, n, k, act)
    if "bitsandbytes" in impls and fmt.get("lut"):
        _add_bitsandbytes(made, w, fmt["group"])
    if "cublas_bf16" in impls:  # in the activation dtype: w is act's dequantized weight
        made["cublas_bf16"] = lambda x: F.linear(x, w)
    if "read_floor" in impls:
        floor = read_floor(mod.packed if fmt["bits"] == 4 else fmt["q"])
        made["read_floor"] = lambda x: floor()
    if fmt.get("lut"):
        pass  # neither tinygemm nor Inductor's comparisons are made for lookup tables here
    elif "tinygemm" in impls and fmt["bits"] == 4 and act != torch.bfloat16:
        print(f"  tinygemm: bf16 activations only, not {ACT_NAME[act]}", flush=True)
    elif "tinygemm" in impls and fmt["bits"] == 4:
        try:
            # tinygemm dequantizes (u - 8) * s + zp of unsigned nibbles u: zp = (8 - z) * s
            # gives (q - z) * s; signed q is u = q + 8 with zp = 0
            q = fmt["q"].to(torch.int32) + (8 if fmt["signed"] else 0)
            packed = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
            wt = torch._convert_weight_to_int4pack(packed, 8)
            s = fmt["s"].t()
            zp = torch.zeros_like(s) if fmt["z"] is None else (8 - fmt["z"].t()) * s
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


def _add_bitsandbytes(made: dict, w: torch.Tensor, block: int) -> None:
    """bitsandbytes' own NF4 path, where its wheel loads: ``matmul_4bit`` on the weight it
    quantizes itself (NF4, ``block`` along K, no double quant), which runs its GEMV kernel for
    one token and dequantizes to the activation type + a cuBLAS GEMM for more."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
        qweight, state = bnbF.quantize_4bit(w, blocksize=block, quant_type="nf4")
    except Exception as e:  # noqa: BLE001 - no wheel, or none for this GPU/CUDA: say so
        print(f"  bitsandbytes unavailable: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return
    made["bitsandbytes"] = lambda x: bnb.matmul_4bit(x, qweight.t(), quant_state=state)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, resolved: patterns, acts, impls, ms, shapes as tuples (an explicit
    flag over --grid's value over --quick's over the defaults)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="M in {1,16,256,2048}, shapes 4096x4096 and 14336x4096, no max-autotune")
    ap.add_argument("--grid", choices=sorted(GRIDS), default=None,
                    help="a preset of shapes, M, patterns, acts and impls (issue25: see above)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_w4a16.jsonl"))
    ap.add_argument("--impls", default=None, help="comma list, default all")
    ap.add_argument("--patterns", default=None,
                    help=f"comma list of {','.join(PATTERNS)} (default all)")
    ap.add_argument("--act", default=None,
                    help="activation dtypes, comma list of bf16,fp16 (default bf16)")
    ap.add_argument("--flush", choices=FLUSHES, default="clean",
                    help="L2 flush before each timed call: clean = read a 256 MB buffer "
                         "(BASELINES.md), zero = do_bench's zero-fill (dirty lines)")
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

    grid = GRIDS[args.grid] if args.grid else {}
    if args.impls:
        args.impls = tuple(args.impls.split(","))
    elif "impls" in grid:
        args.impls = grid["impls"]
    else:
        args.impls = (tuple(i for i in IMPLS if i != "inductor_max_autotune") if args.quick
                      else IMPLS)
    if args.ms:
        args.ms = tuple(int(m) for m in args.ms.split(","))
    else:
        args.ms = grid.get("ms") or ((1, 16, 256, 2048) if args.quick else MS)
    if args.shapes:
        args.shapes = tuple(tuple(int(v) for v in s_.split("x")) for s_ in args.shapes.split(","))
    else:
        args.shapes = grid.get("shapes") or (SHAPES[:2] if args.quick else SHAPES)
    args.patterns = (tuple(args.patterns.split(",")) if args.patterns
                     else grid.get("patterns", PATTERNS))
    args.acts = tuple(args.act.split(",")) if args.act else grid.get("acts", ("bf16",))
    args.no_variants = args.no_variants or grid.get("no_variants", False)
    for what, given, known in (("pattern", args.patterns, PATTERNS), ("act", args.acts, ACTS),
                               ("impl", args.impls, IMPLS)):
        bad = [v for v in given if v not in known]
        if bad:
            ap.error(f"unknown {what} {','.join(bad)}; known: {','.join(known)}")
    return args


def make_row(meta: dict, pattern: str, act: str, n: int, k: int, m: int, impl: str, us: float,
             flush: str, **extra) -> dict:
    """One result line: meta, the cell, the median, the flush it was timed under, and
    "act": "fp16" where the activations were fp16 (rows without "act" are bf16)."""
    if flush not in FLUSHES or act not in ACTS:
        raise ValueError(f"flush {flush!r} / act {act!r}")
    rec = dict(meta, pattern=pattern, n=n, k=k, m=m, impl=impl, median_us=round(us, 2),
               flush=flush)
    if act != "bf16":
        rec["act"] = act
    rec.update(extra)
    return rec


def _add_marlin(made, fmt, n, k, act):
    """IST-DASLab's Marlin (fp16 activations, symmetric int4, groups of 128), built from source
    (importable as ``marlin``; BASELINES.md says how), on this cell's integers: the symmetric
    pattern exactly; for the zeros pattern a stand-in of the same shape and bytes (Marlin has
    no zeros), timed only. bf16 cells have no Marlin row (it takes fp16 alone)."""
    if act != torch.float16:
        return
    try:
        import marlin
    except ImportError as e:
        print(f"  marlin unavailable: {e}", flush=True)
        return
    q = fmt["q"].to(torch.int16)
    if not fmt["signed"]:
        q = q - 8  # the zeros pattern's unsigned nibbles as a symmetric stand-in
    s16 = fmt["s"].to(torch.half)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.half)
    lin.weight.data = q.to(torch.half) * s16.repeat_interleave(GROUP, dim=1)
    layer = marlin.Layer(k, n, groupsize=GROUP).cuda()
    layer.pack(lin, s16)
    made["marlin"] = layer
    made["_marlin_weight"] = lin.weight.data if fmt["signed"] else None


def main(argv=None) -> int:
    args = parse_args(argv)

    from qcompile.kernels import mixed_gemm as mg
    from qcompile.kernels import mixed_gemm_sm80 as m80

    impls, ms, shapes = args.impls, args.ms, args.shapes
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
        for pattern in args.patterns:
            for n, k in shapes:
                for act_name in args.acts:
                    act = ACTS[act_name]
                    fmt, w, mod = make_weights(pattern, n, k, act)
                    made = build_impls(pattern, n, k, fmt, w, mod, impls, act)
                    mode = made.pop("_mode", None)
                    marlin_w = made.pop("_marlin_weight", None)
                    layouts = {name[len("_layout_"):]: made.pop(name)
                               for name in [n_ for n_ in made if n_.startswith("_layout_")]}
                    for m in ms:
                        x = torch.randn(m, k, device="cuda").to(act)
                        cells = _cells(args, mg, m80, made, layouts, mode, fmt, act_name, m, n, k)
                        for name, fn, choice in cells:
                            us, extra = _time_cell(args, mg, name, fn, choice, x, w, mode, fmt,
                                                   pattern, act_name, m, n, k)
                            if us is None:
                                continue
                            if name == "marlin":
                                extra["weights"] = ("same" if marlin_w is not None
                                                    else "symmetric stand-in")
                                if marlin_w is not None:
                                    ref = F.linear(x, marlin_w).double()
                                    extra["rel_err_vs_bf16"] = float(
                                        (made["marlin"](x).double() - ref).norm() / ref.norm())
                            if name == "bitsandbytes":  # its own absmax: the same codes
                                extra["weights"] = "quantized by bitsandbytes from the same weight"
                            results[(pattern, act_name, n, k, name, m)] = us
                            rec = make_row(meta, pattern, act_name, n, k, m, name, us,
                                           args.flush, **extra)
                            f.write(json.dumps(rec) + "\n")
                            f.flush()
                            print(f"  {pattern} {act_name} {n}x{k} M={m} {name}: {us:.1f} us",
                                  flush=True)
                    del made, mod, w, fmt
                    torch.cuda.empty_cache()
    _table(results, ms, args.flush)
    _ratio_table(results, ms, args.flush)
    return 0


def _cells(args, mg, m80, made, layouts, mode, fmt, act, m, n, k):
    """(row name, x -> out factory, forced choice or None) of every row of one cell."""
    cells = [(name, fn, None) for name, fn in made.items()]
    if "qcompile" in made and not args.no_variants and not fmt.get("lut"):
        ch = mg.choose_config(m, n, k, act, fmt["bits"], mode)
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
        bits, fam_mode = (4, mg.MODE_LUT) if fmt.get("lut") else (fmt["bits"], mode)
        if not fmt.get("lut") or fmt.get("gemm_config"):  # the lookup-table GEMM's builds
            cells += [(f"qcompile[{mg.config_name(c.config)}/{_DECOMP[c.decomposition]}"
                       f"{c.splits if c.splits > 1 else ''}]", made["qcompile"], c)
                      for c in _all_choices(mg, m, n, k, bits, fam_mode, args.experimental, act)]
        # the heuristic's kernel once more after them: how far the clock
        # drifted over the cell (the qcompile_again rows of results/bench_w4a16.jsonl)
        cells.append(("qcompile_again", made["qcompile"], None))
        if "cublas_bf16" in made:
            cells.append(("cublas_bf16_again", made["cublas_bf16"], None))
    if args.decode and fmt.get("lut") and "qcompile" in made:  # both paths at every M
        cells += [(f"qcompile[{p}]", made["qcompile"], p) for p in ("decode", "dequant")]
        if fmt.get("gemm_config"):
            cells.append(("qcompile[gemm]", made["qcompile"], "gemm"))
            cells.append(("qcompile[gemm.convert]", made["qcompile"], "gemm.convert"))
        if m <= 64:  # and the decode kernel with each lookup (pair table, 16 values)
            cells += [(f"qcompile[decode.{p}]", made["qcompile"], p) for p in ("pairs", "single")]
    elif args.decode:
        for fam_name, fam in (("qcompile", mg), ("qcompile_sm80", m80)):
            if fam_name not in made:
                continue
            cands = fam.candidates(m, n, k, act, fmt["bits"], fmt["group"],
                                   layouts[fam_name], 132)
            cells += [(f"{fam_name}[{c}]", made[fam_name], c)
                      for c in cands if c.startswith("decode.")]
    return cells


def _time_cell(args, mg, name, fn, choice, x, w, mode, fmt, pattern, act, m, n, k):
    """(median us or None if the row failed, the row's extra fields)."""
    call = functools.partial(fn, x, choice) if choice is not None else functools.partial(fn, x)
    extra = {}
    try:
        if name == "qcompile" and fmt.get("lut"):
            from qcompile.kernels import lut_gemm
            extra = dict(config=lut_gemm.path_name(m, n, k, ACTS[act], fmt["group"], fmt["config"]))
        elif name == "qcompile":
            ch = mg.heuristic_choice(m, n, k, act, fmt["bits"], mode, 132, fmt["group"])
            extra = dict(config=mg.choice_name(ch))
        if name.startswith("qcompile"):  # every qcompile row checks numbers
            ref = F.linear(x, w).double()
            out = call()
            if out.dtype != x.dtype:
                raise TypeError(f"returned {out.dtype} for {x.dtype} activations")
            err = ((out.double() - ref).norm() / ref.norm()).item()
            # the historical field name; the reference is F.linear in the activation dtype
            extra["rel_err_vs_bf16"] = err
            if not err < 1e-2:
                print(f"  WARNING {name} {pattern} {act} {n}x{k} M={m}: rel err {err:.3e}")
        return time_graph(call, flush=args.flush), extra
    except Exception as e:  # noqa: BLE001 - one failing impl must not stop all
        print(f"  {name} {pattern} {act} {n}x{k} M={m} failed: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
        return None, extra


_DECOMP = {0: "heur", 1: "dp", 2: "splitk", 3: "streamk"}


def _all_choices(mg, m, n, k, bits, mode, experimental=False, act="bf16"):
    """Every config of the family, with each decomposition worth timing at this size."""
    out = []
    family = mg.LUT_CONFIGS if mode == mg.MODE_LUT else mg.CONFIGS
    for cfg in family + (mg.EXPERIMENTAL_CONFIGS if experimental else ()):
        if (cfg.act, cfg.bits, cfg.mode) != (act, bits, mode):
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


def _table(results, ms, flush="clean"):
    """Every row: us and (cublas_bf16 time / this time) per M. results is keyed by
    (pattern, act, n, k, impl, m)."""
    rows = sorted({(p, a, n, k, i) for (p, a, n, k, i, _) in results},
                  key=lambda r: (r[0], r[1], r[2], r[3], r[4] != "qcompile", r[4]))
    w = max([len(r[4]) for r in rows] + [8])
    head = "".join(f"{'M=' + str(m):>16}" for m in ms)
    print(f"\n{'pattern':15} {'act':4} {'N x K':11} {'impl':{w}}" + head)
    for p, a, n, k, impl in rows:
        line = f"{p:15} {a:4} {f'{n}x{k}':11} {impl:{w}}"
        for m in ms:
            us = results.get((p, a, n, k, impl, m))
            base = results.get((p, a, n, k, "cublas_bf16", m))
            if us is None:
                line += f"{'-':>16}"
            elif base:
                line += f"{us:9.1f} ({base / us:4.2f}x)"[-16:].rjust(16)
            else:
                line += f"{us:16.1f}"
        print(line)
    print(f"(us, median of graph replays, L2 flushed ({flush}) before each; (r x) = cublas_bf16 "
          "time / this time; cublas_bf16 runs in the act dtype)")


def ratio_rows(results, ms):
    """[(pattern, act, 'NxK', {m: (qcompile us, cublas/qcompile, qcompile/read_floor)})]:
    the floor ratio only for M <= 16, where the weight read is the whole cost."""
    out = []
    for p, a, n, k in sorted({(p, a, n, k) for (p, a, n, k, i, _) in results
                              if i == "qcompile"}):
        cells = {}
        for m in ms:
            q = results.get((p, a, n, k, "qcompile", m))
            if q is None:
                continue
            cub = results.get((p, a, n, k, "cublas_bf16", m))
            floor = results.get((p, a, n, k, "read_floor", m))
            cells[m] = (q, cub / q if cub else None,
                        q / floor if floor and m <= 16 else None)
        out.append((p, a, f"{n}x{k}", cells))
    return out


def _ratio_table(results, ms, flush="clean"):
    rows = ratio_rows(results, ms)
    if not rows:
        return
    print(f"\n# qcompile: us [cuBLAS / qcompile; qcompile / read_floor for M <= 16], "
          f"flush {flush}")
    print("| pattern | act | N x K | " + " | ".join(f"M={m}" for m in ms) + " |")
    print("|---|---|---|" + "---|" * len(ms))
    for p, a, nk, cells in rows:
        txt = []
        for m in ms:
            if m not in cells:
                txt.append("-")
                continue
            q, vs_cublas, vs_floor = cells[m]
            parts = [f"{vs_cublas:.2f}x" if vs_cublas else "-"]
            if m <= 16:
                parts.append(f"floor {vs_floor:.2f}" if vs_floor else "floor -")
            txt.append(f"{q:.1f} [{'; '.join(parts)}]")
        print(f"| {p} | {a} | {nk} | " + " | ".join(txt) + " |")


if __name__ == "__main__":
    sys.exit(main())
