"""CUDA implementation of ``qcompile::int8_gemm``: CUTLASS int8 GEMMs with a fused rescale.

``out = ((xq @ wq.T - azp * azp_adj).float() * row_scale * col_scale + bias).to(out_dtype)``
(docs/kernels.md) runs as one kernel: int8 tensor-core GEMM with int32 accumulation, the
epilogue subtracting asymmetric activations' zero-point correction in int32 (exact; when
given), multiplying the per-row and per-column scales, adding the bias and writing bf16 / fp16.

- Hopper (sm_90): ``csrc/int8_gemm_sm90.cu``, CUTLASS 3.x, TMA + warp-specialized wgmma.
  Small M (decode) swaps the operands so the token dimension becomes a narrow (16-wide) N
  tile and the weight rows fill 64-row tiles; stream-K configs split K where few output
  tiles would leave SMs idle.
- Ampere (sm_80 code, with Hopper machine code built from it too, so it also runs on an
  H100): ``csrc/int8_gemm_sm80.cu``, CUTLASS 2.x, stream-K.
- Few tokens (both archs): ``csrc/int8_gemm_decode.cu``, mma.sync on the plain operands,
  weights as the 16-row operand, K split over warps (the launch shapes and their names are
  the mixed-GEMM decode kernel's, ``mixed_gemm_decode.DecodeChoice``).

Configurations are data (:data:`SM90_CONFIGS`, :data:`SM80_CONFIGS`); :func:`choose_config`
is the one heuristic; :func:`candidates` lists what the autotuner times. :func:`run` is the
op's CUDA body (the kernels package registers it), falling back to the reference
implementation for whatever the kernels do not support.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qcompile.kernels import mixed_gemm_decode as decode
from qcompile.kernels.build import KernelBuildError, KernelSpec, build_many, load, load_checked
from qcompile.kernels.mixed_gemm import aligned

__all__ = [
    "Int8GemmConfig",
    "SM80_CONFIGS",
    "SM90_CONFIGS",
    "available_configs",
    "choose_config",
    "decode_spec",
    "heuristic_choice",
    "config_name",
    "device_arch",
    "int8_gemm_cuda",
    "kernel_spec",
    "prebuild",
    "run",
    "candidates",
    "choice_from_name",
    "supports",
]

log = logging.getLogger("qcompile.kernels")

_OUT_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Int8GemmConfig:
    """One kernel configuration. Everything but `splits` is compiled in (-D defines).

    tile: CTA tile (M, N, K) of the GEMM the kernel runs, i.e. after an operand swap.
    swap_ab: compute out^T = wq @ xq^T (token dimension on the narrow N tile).
    splits: run-time stream-K scheduler mode: 0 CUTLASS's heuristic, 1 data-parallel,
        >1 split-K into that many K slices (sm90 stream-K configs only).
    warp, stages: CUTLASS 2.x warp tile and pipeline depth (sm_80 configs only).
    """

    name: str
    arch: str
    tile: tuple[int, int, int]
    cluster: tuple[int, int] = (1, 1)
    pingpong: bool = False
    streamk: bool = False
    swap_ab: bool = False
    splits: int = 0
    warp: tuple[int, int, int] = (0, 0, 0)
    stages: int = 0


SM90_CONFIGS: tuple[Int8GemmConfig, ...] = (
    # Decode: operands swapped, tokens on a 16/32/64-wide N tile, weight rows on the M tile.
    # Ping-pong with 64 weight rows per tile: twice the tiles of a 128-row tile (224 for
    # N=14336 on 132 SMs), no split-K reduction; the fastest measured for M <= 64, the
    # 256-deep K tile (half the pipeline round trips) ahead of the 128-deep one wherever
    # both were timed (docs/design.md).
    Int8GemmConfig("sm90_swap_64x16x256_pp", "sm_90a", (64, 16, 256), pingpong=True, swap_ab=True),
    Int8GemmConfig("sm90_swap_64x16_pp", "sm_90a", (64, 16, 128), pingpong=True, swap_ab=True),
    # Cooperative 128-row tiles with a stream-K scheduler, which splits K when N/128 tiles
    # (32 for N=4096) would leave most SMs idle.
    Int8GemmConfig("sm90_swap_128x16_sk", "sm_90a", (128, 16, 128), streamk=True, swap_ab=True),
    Int8GemmConfig("sm90_swap_128x32_sk", "sm_90a", (128, 32, 128), streamk=True, swap_ab=True),
    Int8GemmConfig("sm90_swap_128x64_sk", "sm_90a", (128, 64, 128), streamk=True, swap_ab=True),
    # Middle M: 128x128 tiles.
    Int8GemmConfig("sm90_128x128_sk", "sm_90a", (128, 128, 128), streamk=True),
    Int8GemmConfig("sm90_128x128_pp_c2", "sm_90a", (128, 128, 128), cluster=(2, 1), pingpong=True),
    # Large M (prefill): the widest tile, A multicast over a 2-CTA cluster.
    Int8GemmConfig("sm90_128x256_c2", "sm_90a", (128, 256, 128), cluster=(2, 1)),
)

SM80_CONFIGS: tuple[Int8GemmConfig, ...] = (
    Int8GemmConfig("sm80_32x128_sk", "sm_80", (32, 128, 128), warp=(32, 32, 128), stages=4),
    Int8GemmConfig("sm80_128x128_sk", "sm_80", (128, 128, 64), warp=(64, 64, 64), stages=4),
)

_BY_NAME = {c.name: c for c in SM90_CONFIGS + SM80_CONFIGS}


def available_configs(arch: str | None = None) -> tuple[Int8GemmConfig, ...]:
    """Every configuration, or those of one arch ("sm_90a" or "sm_80")."""
    configs = SM90_CONFIGS + SM80_CONFIGS
    return tuple(c for c in configs if arch is None or c.arch == arch)


def config_name(cfg: Int8GemmConfig) -> str:
    """Short readable name, as used in the match report."""
    return cfg.name if cfg.splits == 0 else f"{cfg.name}_s{cfg.splits}"


def choose_config(M: int, N: int, K: int, out_dtype: torch.dtype, arch: str) -> Int8GemmConfig:
    """The configuration for a problem.

    Token count M first: it decides whether the GEMM streams the weight (small M,
    memory-bound) or is compute-bound. Each pick is the fastest config, or about as fast,
    where every config was timed (``benchmarks/bench_w8a8.py --configs all``; N x K in
    4096x4096, 14336x4096, 4096x14336, M in 1..2048): one rule a range of M rather than
    the winner of each cell, at the cost of two cells a few percent behind
    (docs/design.md, heuristic).
    """
    del K, out_dtype
    if arch == "sm_90a":
        if M <= 64:
            return _BY_NAME["sm90_swap_64x16x256_pp"]
        if M <= 256:
            # Wide layers have enough 128x256 tiles; narrow ones keep the swapped kernel,
            # whose 128x64 tiles (4 per 128 weight rows at M=256) fill more SMs, and up to
            # M = 128 its 32-token tiles, which make twice the tiles again and were faster
            # than the 64-token ones there (docs/design.md).
            if N >= 8192:
                return _BY_NAME["sm90_128x256_c2"]
            return _BY_NAME["sm90_swap_128x32_sk" if M <= 128 else "sm90_swap_128x64_sk"]
        return _BY_NAME["sm90_128x256_c2"]
    return _BY_NAME["sm80_32x128_sk"] if M <= 32 else _BY_NAME["sm80_128x128_sk"]


# Token counts up to which the heuristic runs the decode kernel (int8_gemm_decode.cu).
DECODE_MAX_M = 8
DECODE_SOURCE = "int8_gemm_decode.cu"


def decode_fits(m: int, n: int, k: int, choice: decode.DecodeChoice | None = None) -> bool:
    """Whether the decode kernel takes this problem (and launch shape): the mixed decode
    kernel's rule for a scale applied after the sum (no groups)."""
    return decode.fits(m, n, k, k, decode.MODE_ROWSCALE, choice)


def heuristic_choice(m: int, n: int, k: int, out_dtype: torch.dtype, arch: str
                     ) -> Int8GemmConfig | decode.DecodeChoice:
    """The kernel without measurements: the decode kernel up to DECODE_MAX_M tokens where
    it takes the shape, else :func:`choose_config`."""
    if m <= DECODE_MAX_M and decode_fits(m, n, k):
        return decode.heuristic(m, n, k)
    return choose_config(m, n, k, out_dtype, arch)


def decode_spec(out_dtype: torch.dtype) -> KernelSpec:
    """The decode kernel's library for an output dtype (sm_80 code, also run on Hopper)."""
    return KernelSpec(DECODE_SOURCE, {"QC_OUT_BF16": int(out_dtype == torch.bfloat16)}, "sm_80")


def _name(choice: Int8GemmConfig | decode.DecodeChoice) -> str:
    return choice.name if isinstance(choice, decode.DecodeChoice) else config_name(choice)


def device_arch(device: torch.device | int | None = None) -> str | None:
    """The kernel arch for a CUDA device: "sm_90a" on Hopper, "sm_80" on Ampere/Ada, else None."""
    if isinstance(device, int):
        index = device
    elif device is not None and device.index is not None:
        index = device.index
    else:
        index = torch.cuda.current_device()
    return _arch_of_index(index)


@functools.cache
def _arch_of_index(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) == (9, 0):
        return "sm_90a"
    if major == 8:
        return "sm_80"
    return None  # sm_90a code does not run on later majors; sm_80 SASS is built for 8.x and 9.0


def kernel_spec(cfg: Int8GemmConfig, out_dtype: torch.dtype) -> KernelSpec:
    """The library that implements `cfg` for `out_dtype`."""
    bf16 = 1 if out_dtype == torch.bfloat16 else 0
    if cfg.arch == "sm_90a":
        defines = {
            "QC_TILE_M": cfg.tile[0], "QC_TILE_N": cfg.tile[1], "QC_TILE_K": cfg.tile[2],
            "QC_CLUSTER_M": cfg.cluster[0], "QC_CLUSTER_N": cfg.cluster[1],
            "QC_PINGPONG": int(cfg.pingpong), "QC_STREAMK": int(cfg.streamk),
            "QC_SWAP_AB": int(cfg.swap_ab), "QC_OUT_BF16": bf16,
        }
        return KernelSpec("int8_gemm_sm90.cu", defines, "sm_90a")
    defines = {
        "QC_TILE_M": cfg.tile[0], "QC_TILE_N": cfg.tile[1], "QC_TILE_K": cfg.tile[2],
        "QC_WARP_M": cfg.warp[0], "QC_WARP_N": cfg.warp[1], "QC_WARP_K": cfg.warp[2],
        "QC_STAGES": cfg.stages, "QC_OUT_BF16": bf16,
    }
    return KernelSpec("int8_gemm_sm80.cu", defines, "sm_80")


def prebuild(configs: Sequence[Int8GemmConfig] | None = None,
             out_dtypes: Sequence[torch.dtype] = _OUT_DTYPES, max_workers: int | None = None) -> None:
    """Compile the libraries of `configs` (default: all, and the decode kernel) for
    `out_dtypes` into the cache."""
    specs = [kernel_spec(c, d) for c in (available_configs() if configs is None else configs)
             for d in out_dtypes]
    if configs is None:
        specs += [decode_spec(d) for d in out_dtypes]
    build_many(specs, max_workers=max_workers)


_decode_fns: dict[torch.dtype, object] = {}


def _decode_function(out_dtype: torch.dtype):
    fn = _decode_fns.get(out_dtype)
    if fn is None:
        lib = load_checked(decode_spec(out_dtype), {
            "qc_int8_gemm_decode": (ctypes.c_int, [_vp] * 8 + [_i] * 8 + [_vp]),
        }, info=("qc_int8_gemm_decode_info", [int(out_dtype == torch.bfloat16)]))
        fn = lib.qc_int8_gemm_decode
        _decode_fns[out_dtype] = fn
    return fn


_vp, _i, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_bound: dict[tuple[Int8GemmConfig, torch.dtype], tuple] = {}


def _functions(cfg: Int8GemmConfig, out_dtype: torch.dtype) -> tuple:
    """(gemm, workspace_size) ctypes functions of the library for cfg/out_dtype.

    Memoized per config (splits is a run-time argument of the same library): finding a
    library in the disk cache hashes sources and asks nvcc its version, too slow per call.
    """
    key = (dataclasses.replace(cfg, splits=0), out_dtype)
    fns = _bound.get(key)
    if fns is None:
        lib = load(kernel_spec(cfg, out_dtype))
        if cfg.arch == "sm_90a":
            gemm, ws = lib.qc_int8_gemm_sm90, lib.qc_int8_gemm_sm90_workspace_size
            gemm.argtypes = [_vp] * 8 + [_i, _i, _i, _i, _i, _i, _vp, _sz, _vp]
            ws.argtypes = [_i, _i, _i, _i]
        else:
            gemm, ws = lib.qc_int8_gemm_sm80, lib.qc_int8_gemm_sm80_workspace_size
            gemm.argtypes = [_vp] * 8 + [_i, _i, _i, _i, _vp, _sz, _vp]
            ws.argtypes = [_i, _i, _i]
        gemm.restype = ctypes.c_int
        ws.restype = ctypes.c_size_t
        fns = _bound[key] = (gemm, ws)
    return fns


def supports(xq: torch.Tensor, wq: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, azp: torch.Tensor | None = None,
             azp_adj: torch.Tensor | None = None) -> str | None:
    """None when the CUDA kernels can run these inputs, else the reason they cannot."""
    if xq.device.type != "cuda" or wq.device != xq.device:
        return "inputs not on one CUDA device"
    if device_arch(xq.device) is None:
        return f"no kernel for compute capability {torch.cuda.get_device_capability(xq.device)}"
    if out_dtype not in _OUT_DTYPES:
        return f"out_dtype {out_dtype} (bf16/fp16 only)"
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or xq.dim() != 2 or wq.dim() != 2:
        return "xq and wq must be 2-D int8"
    m, k = xq.shape
    n = wq.shape[0]
    if wq.shape[1] != k or m == 0 or n == 0 or k == 0:
        return f"shapes {tuple(xq.shape)} x {tuple(wq.shape)}"
    # 16-byte rows for TMA / cp.async of int8 operands; 16-byte rows of the 2-byte output.
    if k % 16 or n % 8:
        return f"alignment: needs K % 16 == 0 and N % 8 == 0 (K={k}, N={n})"
    if max(m, n, k) >= 2**31 or m * k >= 2**31 or n * k >= 2**31 or m * n >= 2**31:
        return "sizes beyond 32-bit indexing"
    for name, t in (("xq", xq), ("wq", wq)):
        if not t.is_contiguous() or t.data_ptr() % 16:
            return f"{name} must be contiguous and 16-byte aligned"
    if row_scale.numel() not in (1, m) or col_scale.numel() not in (1, n):
        return f"scale shapes {tuple(row_scale.shape)}, {tuple(col_scale.shape)}"
    for t in (row_scale, col_scale):
        if t.device != xq.device or not t.is_floating_point():
            return "scales must be floating-point tensors on the device of xq"
    if bias is not None and (bias.numel() != n or bias.device != xq.device or not bias.is_floating_point()):
        return f"bias shape {tuple(bias.shape)}"
    if (azp is None) != (azp_adj is None):
        return "azp and azp_adj come together"
    if azp is not None:
        # the zero points follow the row scale (one per token, or one for all)
        if azp.numel() != row_scale.numel() or azp_adj.numel() != n:
            return f"zero-point shapes {tuple(azp.shape)}, {tuple(azp_adj.shape)}"
        for t in (azp, azp_adj):
            if t.device != xq.device or t.dtype != torch.int32:
                return "azp and azp_adj must be int32 tensors on the device of xq"
    return None


def _vector(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # No-ops (no kernel launch) for the usual contiguous float32 scales / matching bias.
    return aligned(t.reshape(-1).to(dtype))


def _epilogue_operands(xq, row_scale, col_scale, bias, out_dtype, azp, azp_adj, n: int):
    """What every int8 kernel's epilogue reads, as the kernels take it: float32 row and
    column scales, the bias in the output type, the int32 zero points and their column
    correction (None, None when symmetric), and the output [M, N]."""
    rs = _vector(row_scale, torch.float32)
    cs = _vector(col_scale, torch.float32)
    b = _vector(bias, out_dtype) if bias is not None else None
    zp, adj = (None, None) if azp is None else (_vector(azp, torch.int32),
                                                _vector(azp_adj, torch.int32))
    out = torch.empty((xq.shape[0], n), dtype=out_dtype, device=xq.device)
    return rs, cs, b, zp, adj, out


def int8_gemm_cuda(xq: torch.Tensor, wq: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype,
                   config: Int8GemmConfig | decode.DecodeChoice | None = None,
                   azp: torch.Tensor | None = None,
                   azp_adj: torch.Tensor | None = None) -> torch.Tensor:
    """qcompile::int8_gemm on the GPU through the CUTLASS kernels.

    Raises ValueError for inputs the kernels do not support (see :func:`supports`) and
    KernelBuildError when the library cannot be built. Launches on the current stream with
    no host synchronization, so it can be captured in a CUDA graph.
    """
    reason = supports(xq, wq, row_scale, col_scale, bias, out_dtype, azp, azp_adj)
    if reason is not None:
        raise ValueError(f"int8_gemm_cuda: unsupported input: {reason}")
    m, k = xq.shape
    n = wq.shape[0]
    arch = device_arch(xq.device)
    cfg = config if config is not None else heuristic_choice(m, n, k, out_dtype, arch)
    if isinstance(cfg, decode.DecodeChoice):
        return _int8_gemm_decode(xq, wq, row_scale, col_scale, bias, out_dtype, cfg, azp, azp_adj)
    if cfg.arch != arch and not (cfg.arch == "sm_80" and arch == "sm_90a"):
        raise ValueError(f"config {cfg.name} is for {cfg.arch}, device is {arch}")
    gemm, ws_size = _functions(cfg, out_dtype)

    with torch.cuda.device(xq.device):
        rs, cs, b, zp, adj, out = _epilogue_operands(xq, row_scale, col_scale, bias, out_dtype,
                                                     azp, azp_adj, n)
        if cfg.arch == "sm_80" and cs.numel() == 1 and n > 1:
            cs = cs.expand(n).contiguous()  # the 2.x row-broadcast visitor reads a full vector
        stream = torch.cuda.current_stream(xq.device).cuda_stream
        if cfg.arch == "sm_90a":
            nbytes = ws_size(m, n, k, cfg.splits)
        else:
            nbytes = ws_size(m, n, k)
        ws = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=xq.device)
        if cfg.arch == "sm_90a":
            err = gemm(out.data_ptr(), xq.data_ptr(), wq.data_ptr(), rs.data_ptr(), cs.data_ptr(),
                       _ptr(b), _ptr(zp), _ptr(adj), m, n, k, int(rs.numel() != 1),
                       int(cs.numel() != 1), cfg.splits, ws.data_ptr(), nbytes, stream)
        else:
            err = gemm(out.data_ptr(), xq.data_ptr(), wq.data_ptr(), rs.data_ptr(), cs.data_ptr(),
                       _ptr(b), _ptr(zp), _ptr(adj), m, n, k, int(rs.numel() != 1),
                       ws.data_ptr(), nbytes, stream)
    if err != 0:
        raise RuntimeError(f"int8 GEMM kernel {config_name(cfg)} failed with error {err} "
                           f"(M={m}, N={n}, K={k})")
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _int8_gemm_decode(xq, wq, row_scale, col_scale, bias, out_dtype, choice, azp=None,
                      azp_adj=None):
    m, k = xq.shape
    n = wq.shape[0]
    if not decode_fits(m, n, k, choice):
        raise ValueError(f"int8_gemm_cuda: decode kernel {choice.name} does not take M={m} "
                         f"N={n} K={k} (M <= {decode.MAX_TOKENS}, K % 64, N % {choice.rows})")
    fn = _decode_function(out_dtype)
    with torch.cuda.device(xq.device):
        rs, cs, b, zp, adj, out = _epilogue_operands(xq, row_scale, col_scale, bias, out_dtype,
                                                     azp, azp_adj, n)
        stream = torch.cuda.current_stream(xq.device).cuda_stream
        err = fn(out.data_ptr(), xq.data_ptr(), wq.data_ptr(), rs.data_ptr(), cs.data_ptr(),
                 _ptr(b), _ptr(zp), _ptr(adj), m, n, k, int(rs.numel() != 1),
                 int(cs.numel() != 1), choice.tokens // 8, choice.rows // 16, choice.warps,
                 stream)
    if err != 0:
        raise RuntimeError(f"int8 decode kernel {choice.name} failed with error {err} "
                           f"(M={m}, N={n}, K={k})")
    return out


_disabled: list[str] = []  # the reason the kernels were turned off, once a build failed


def choice_from_name(name: str) -> Int8GemmConfig | decode.DecodeChoice:
    """The config a :func:`config_name` names (``<config>_s<k>``: split-K into k slices), or
    a decode-kernel launch shape (``decode.t8.r32.w4``)."""
    if decode.is_name(name):
        return decode.choice_from_name(name)
    if name in _BY_NAME:
        return _BY_NAME[name]
    base, sep, splits = name.rpartition("_s")
    cfg = _BY_NAME.get(base)
    if sep and cfg is not None and cfg.streamk and splits.isdigit() and int(splits) >= 1:
        return dataclasses.replace(cfg, splits=int(splits))
    raise ValueError(f"no int8 GEMM config named {name!r}")


def candidates(m: int, n: int, k: int, out_dtype: torch.dtype, arch: str) -> list[str]:
    """Configs worth timing for one problem: the heuristic's first, the decode kernel's
    launch shapes (m <= 32), then the swapped (token-on-N) kernels for small M or the wide
    tiles for large M, split-K variants of the stream-K ones, and on Hopper the sm_80
    kernels too (they run there)."""
    names = [_name(heuristic_choice(m, n, k, out_dtype, arch))]
    if decode_fits(m, n, k):
        names += decode.candidates(m, n, k)
    for cfg in available_configs():
        if cfg.arch != arch and not (cfg.arch == "sm_80" and arch == "sm_90a"):
            continue
        token_tile = cfg.tile[1] if cfg.swap_ab else cfg.tile[0]
        if (m <= 64 and token_tile > 64) or (m > 256 and cfg.swap_ab and token_tile < 64):
            continue
        names.append(config_name(cfg))
        if cfg.streamk and cfg.arch == "sm_90a" and m <= 256:
            names += [config_name(dataclasses.replace(cfg, splits=s)) for s in (2, 4)
                      if k // cfg.tile[2] >= 4 * s]
    return list(dict.fromkeys(names))


def run(xq, wq, row_scale, col_scale, bias, out_dtype, config: str = "", azp=None,
        azp_adj=None):
    """``qcompile::int8_gemm`` on CUDA (the kernels package registers it): the CUTLASS
    kernel named by ``config`` for this M (a kernels.tuning table; "" = the heuristic),
    or the reference where the kernels do not support the call."""
    from qcompile.kernels import tuning
    from qcompile.kernels.ops import int8_gemm_reference

    if not _disabled and supports(xq, wq, row_scale, col_scale, bias, out_dtype, azp,
                                  azp_adj) is None:
        name = tuning.lookup(config, xq.shape[0])
        try:
            return int8_gemm_cuda(xq, wq, row_scale, col_scale, bias, out_dtype,
                                  choice_from_name(name) if name else None, azp, azp_adj)
        except KernelBuildError as e:
            _disabled.append(str(e))
            log.warning("qcompile int8 GEMM kernels unavailable, using the reference "
                        "implementation: %s", e)
    return int8_gemm_reference(xq, wq, row_scale, col_scale, bias, out_dtype, config, azp,
                               azp_adj)


# Token counts at which choose_config may change its pick; the report lists the configs
# a symbolic M can dispatch to.
_M_PROBES = (1, 64, 65, 256, 257, 4096)


def describe(m: int | None, n: int, k: int, out_dtype: torch.dtype,
             device: torch.device) -> str:
    """Name the kernel(s) a problem will run on, for the match report.

    Loads (building if needed, with progress logged) the libraries it names, so that a
    missing toolchain shows up at compile time, never during a CUDA-graph capture.
    Raises KernelBuildError or ValueError when the kernels cannot serve the problem.
    """
    arch = device_arch(device)
    if arch is None:
        raise ValueError(f"no int8 kernel for compute capability "
                         f"{torch.cuda.get_device_capability(device)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} (bf16/fp16 only)")
    if k % 16 or n % 8:
        raise ValueError(f"alignment: needs K % 16 == 0 and N % 8 == 0 (K={k}, N={n})")
    ms = (m,) if m is not None else _M_PROBES
    picks = list(dict.fromkeys(heuristic_choice(mm, n, k, out_dtype, arch) for mm in ms))
    configs = [c for c in picks if not isinstance(c, decode.DecodeChoice)]
    uses_decode = len(configs) < len(picks)
    build_many([kernel_spec(c, out_dtype) for c in configs]
               + ([decode_spec(out_dtype)] if uses_decode else []))
    for c in configs:
        _functions(c, out_dtype)
    if uses_decode:
        _decode_function(out_dtype)
    names = ", ".join(_name(c) for c in picks)
    note = " (decode.*: qcompile's mma.sync decode kernel)" if uses_decode else ""
    return (f"cutlass {names}" if m is not None else f"cutlass by M: {names}") + note
