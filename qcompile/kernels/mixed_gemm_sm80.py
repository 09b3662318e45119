r"""Ampere-class CUTLASS 2.x mixed-input GEMM (bf16/fp16 activations x int8 weights) for
``qcompile::mixed_gemm``: sm_80 code, so it runs on A100/A10/L4/L40S/RTX 30-40 and (as
sm_90 machine code built from the same PTX) on an H100 as one more candidate.

NOT YET RUN ON A GPU: :func:`register_cuda_impl` exists but nothing calls it, and
``qcompile/kernels/__init__.py`` does not import this module. Validate with
``tests/gpu/test_mixed_gemm_sm80_cuda.py`` first.

What is here: configurations (data), :func:`choose_config` (the one heuristic), the offline
weight preparation in torch (:func:`prepare_weight` / :func:`unprepare_weight`), the
ctypes call into ``csrc/mixed_gemm_sm80.cu`` and a PyTorch fallback for prepared weights.

Kernel (csrc/mixed_gemm_sm80.cu): CUTLASS's multistage cp.async main loop with the
mixed-input warp MMA (``arch::OpMultiplyAddMixedInputUpcast``): int8 weight tiles go
through shared memory as bytes and are converted to bf16/fp16 in registers (bias-trick
converters: prmt + one subtraction instead of a cvt per element; bf16 goes through float
and packs pairs with one cvt) right before a 16-bit ``mma.sync``; the per-channel scale
and the bias are applied in the epilogue; a stream-K threadblock swizzle gives split-K for
small M (decode) and data-parallel tiles for large M.

Layouts (the op's ``layout`` argument):

- ``sm80_mixed_v1_rowscale`` (runs on the kernel): signed int8 per-channel weights without
  zeros. ``qweight`` int8 [N, K]; ``scales`` float32 [N]; ``zeros`` None.
- ``sm80_mixed_v1_groupzero`` (format defined, kernel TODO): everything else, int4 or int8.
  ``qweight`` holds q' = q - 2**(bits-1) for unsigned formats (signed values as they are),
  ``scales``/``zeros`` are [K/g, N] in the activation dtype and W = q' * s + z' (z' folds
  the shift and the zero mode in, as in the Hopper family's groupzero layout). Only
  :func:`reference_prepared` runs it today; :func:`select_layout` never returns it.
  TODO(issue 6): the main loop for it needs (a) int4 operands: upstream's register
  shuffle (mma_mixed_input_tensor_op.h, FragmentShuffler) handles a 2:1 width ratio only,
  so int4 x 16-bit needs either a 4:1 shuffle or TRT-LLM's offline column interleave
  (then this becomes a v2 layout), and (b) a scale/zero tile iterator staged through
  shared memory with the operands (one [1, tile_n] row of s and z' per group, loaded by
  cp.async in the same pipeline stage as the K tile that starts the group) and applied
  as ``w = q' * s + z'`` between the conversion and the MMA.

Weight layout: the GEMM is out[M, N] = x[M, K] @ W[N, K].T with x as CUTLASS's A (row-major)
and W as its B, column-major [K, N] -- which is W [N, K] row-major, K fastest. Memory is
cut into 128-bit chunks, each one ``cp.async.cg`` of 16 bytes::

    int8 (rowscale / groupzero, bits 8): chunk c of row n = q[n, 16c .. 16c+15]
    int4 (groupzero, bits 4):            chunk c of row n = q[n, 32c .. 32c+31],
                                         k even -> low nibble of byte k//2, odd -> high

              k = 0     16     32     48     64 ...                      K
    n = 0     [ c0   ][ c1   ][ c2   ][ c3   ][ c4 ...                  ]   one row =
    n = 1     [ c0   ][ c1   ][ c2   ][ c3   ][ c4 ...                  ]   K/16 chunks
     ...        \___ one 64-deep K tile of one row: 4 chunks (int8) ___/

Why this order and not an interleaved one: a CTA's weight tile is tile_n rows x 64 k, i.e.
4 whole chunks per row, so every global load is a full, aligned 128-bit cp.async straight
into shared memory, where CUTLASS's crosswise layout XOR-swizzles the chunk index with the
row so that ``ldmatrix`` reads it without bank conflicts. ``ldmatrix`` on bytes hands each
lane pairs of k that the 16-bit MMA fragment wants in another lane; the mixed-input warp
MMA fixes that in registers (2 ``shfl`` + 1 ``prmt`` per 4 values) instead of an offline
column interleave. The only offline work is therefore the range check, the signed shift
and the scale folding -- and int4's nibble order is exactly ``cutlass::int4b_t``'s.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import threading
from dataclasses import dataclass

import torch

from . import mixed_gemm, ops

log = logging.getLogger("qcompile.kernels")

__all__ = [
    "CONFIGS",
    "LAYOUT_GROUPZERO",
    "LAYOUT_ROWSCALE",
    "LAYOUTS",
    "Choice",
    "MixedGemmSm80Config",
    "build_all",
    "choose_config",
    "config_name",
    "describe",
    "mixed_gemm_sm80_cuda",
    "prepare_weight",
    "reference_prepared",
    "register_cuda_impl",
    "select_layout",
    "supports",
    "unprepare_weight",
]

SOURCE = "mixed_gemm_sm80.cu"
ARCH = "sm_80"
LAYOUT_ROWSCALE = "sm80_mixed_v1_rowscale"
LAYOUT_GROUPZERO = "sm80_mixed_v1_groupzero"
LAYOUTS = (LAYOUT_ROWSCALE, LAYOUT_GROUPZERO)
KERNEL_LAYOUTS = (LAYOUT_ROWSCALE,)  # the layouts the CUDA kernel runs today

# Alignment: K in 16-byte chunks of int8 (and 8-element cp.async of x); N a multiple of 8
# for the 16-byte epilogue stores of the 2-byte output and the scale/bias vector loads.
# The prepared format itself (torch) takes any N and K % 2 == 0 (int4 bytes).
K_ALIGN = 16
N_ALIGN = 8

_ACT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# decomposition argument of the kernel (same numbering as the Hopper family)
DECOMP_HEURISTIC, DECOMP_DATA_PARALLEL, DECOMP_SPLIT_K, DECOMP_STREAM_K = 0, 1, 2, 3


@dataclass(frozen=True)
class MixedGemmSm80Config:
    """One compiled kernel (all fields are -D defines of the source).

    tile: CTA tile (tokens M, output channels N, K); warp: warp tile (tile / warp = the
    warps per CTA); stages: cp.async pipeline depth.
    """

    act: str                      # "bf16" | "fp16"
    tile: tuple[int, int, int]
    warp: tuple[int, int, int]
    stages: int

    def defines(self) -> dict[str, int]:
        return {
            "QC_ACT_FP16": int(self.act == "fp16"),
            "QC_TILE_M": self.tile[0], "QC_TILE_N": self.tile[1], "QC_TILE_K": self.tile[2],
            "QC_WARP_M": self.warp[0], "QC_WARP_N": self.warp[1], "QC_WARP_K": self.warp[2],
            "QC_STAGES": self.stages,
        }

    def info(self) -> list[int]:
        """What qc_mixed_gemm_sm80_info of this build must report."""
        return [int(self.act == "fp16"), *self.tile, *self.warp, self.stages]


def config_name(cfg: MixedGemmSm80Config) -> str:
    """Short readable name for reports, e.g. ``sm80.bf16.w8.16x128x64.s5``."""
    m, n, k = cfg.tile
    return f"sm80.{cfg.act}.w8.{m}x{n}x{k}.s{cfg.stages}"


# Token tiles 16 / 32 for decode (fewer wasted MMA rows; split-K fills the SMs), 64 and
# 128 for prefill. 128 output channels per CTA everywhere: with int8 weights a 128 x 64
# tile is 8 KiB per stage, so even 5 stages of the 16-token tile fit comfortably.
# ptxas -v, nvcc 13.0 / CUTLASS 4.2 (2026-11-25), registers per thread bf16/fp16 for the
# sm_80 | sm_90 machine code, no spills anywhere: 16x128 80/95 | 72/70, 32x128 128/128 |
# 96/94, 64x128 168/168 | 168/168, 128x128 165/167 | 150/158. The 128x128 tile uses 8 warps
# of 64x32: with 4 warps of 64x64 it needs 255 registers and spills in fp16.
_TILES = (
    ((16, 128, 64), (16, 32, 64), 5),
    ((32, 128, 64), (32, 32, 64), 4),
    ((64, 128, 64), (32, 64, 64), 4),
    ((128, 128, 64), (64, 32, 64), 4),
)
CONFIGS: tuple[MixedGemmSm80Config, ...] = tuple(
    MixedGemmSm80Config(act, tile, warp, stages)
    for act in ("bf16", "fp16") for tile, warp, stages in _TILES
)


@dataclass(frozen=True)
class Choice:
    """A config plus how the stream-K swizzle splits the work for one call."""

    config: MixedGemmSm80Config
    decomposition: int = DECOMP_DATA_PARALLEL
    splits: int = 1


def choose_config(m: int, n: int, k: int, act: str, sm_count: int = 108) -> Choice:
    """Pick the kernel for out[m, n] = x[m, k] @ W[n, k].T (int8 per-channel weights).

    Not yet measured (no GPU run); the same rules as the Hopper family's heuristic:
    the smallest token tile that holds m for m <= 64; beyond, the widest tile that still
    gives at least half the SMs a tile. When the output tiles leave SMs idle (decode:
    4096 channels are 32 tiles of 128), K is split over about sm_count / tiles CTAs,
    keeping at least 8 K tiles (512) per split.
    """
    family = sorted((c for c in CONFIGS if c.act == act), key=lambda c: c.tile[0])
    if not family:
        raise ValueError(f"no sm80 mixed-GEMM config for act={act}")
    if m <= 64:
        cfg = next((c for c in family if c.tile[0] >= m), family[-1])
    else:
        wide = [c for c in family if c.tile[0] >= 64]
        cfg = wide[0]
        for c in reversed(wide):
            if math.ceil(n / c.tile[1]) * math.ceil(m / c.tile[0]) >= sm_count // 2:
                cfg = c
                break
    tiles = math.ceil(n / cfg.tile[1]) * math.ceil(m / cfg.tile[0])
    splits = min(sm_count // max(tiles, 1), math.ceil(k / cfg.tile[2]) // 8, 16)
    if splits >= 2:
        return Choice(cfg, DECOMP_SPLIT_K, splits)
    return Choice(cfg, DECOMP_DATA_PARALLEL, 1)


# --- weight preparation (torch; runs on CPU or GPU) -------------------------------------

def _range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _layout_for(bits: int, signed: bool, group_size: int, zero_mode: str, k: int) -> str:
    rowscale = bits == 8 and signed and zero_mode == "none" and group_size == k
    return LAYOUT_ROWSCALE if rowscale else LAYOUT_GROUPZERO


def pack_signed(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values q [N, K] (in range) -> qweight: int8 [N, K], or uint8 [N, K/2] for int4
    (element k in the low nibble of byte k//2 when k is even: ``cutlass::int4b_t`` order)."""
    q = q.to(torch.int8)
    if bits == 8:
        return q.contiguous()
    nib = q.view(torch.uint8) & 0xF
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def unpack_signed(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_signed`: the signed values as int8 [N, K]."""
    if bits == 8:
        return qweight.view(torch.int8)
    b = qweight.view(torch.uint8).to(torch.int16)
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(qweight.shape[0], -1)
    return torch.where(nib > 7, nib - 16, nib).to(torch.int8)


def select_layout(bits: int, signed: bool, group_size: int, zero_mode: str, n: int, k: int,
                  act_dtype: torch.dtype, device: torch.device | str) -> str | None:
    """This family's layout for a weight format, or None if its kernel cannot run it.

    Only signed int8 per-channel weights without zeros today (see the module docstring).
    Builds (or finds cached) the kernels, so a missing toolchain shows up here as
    KernelBuildError, before the weight is packed for a kernel that cannot run.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if not _arch_ok(torch.cuda.get_device_capability(device)):
        return None
    if act_dtype not in _ACT_NAMES or zero_mode not in ops.ZERO_MODES:
        return None
    if n % N_ALIGN or k % K_ALIGN or group_size <= 0 or k % group_size:
        return None
    layout = _layout_for(bits, signed, group_size, zero_mode, k)
    if layout not in KERNEL_LAYOUTS:
        return None
    build_all([c for c in CONFIGS if c.act == _ACT_NAMES[act_dtype]])
    return layout


def _arch_ok(capability: tuple[int, int]) -> bool:
    # The library holds sm_80 and sm_90 machine code (build.py), no PTX: 8.x and 9.0 only.
    return capability[0] == 8 or capability == (9, 0)


def describe(layout: str, m: int | None, n: int, k: int, act_dtype: torch.dtype,
             device: torch.device | str, bits: int = 8, group_size: int | None = None) -> str:
    """One line for the match report: the config(s) this problem dispatches to by M."""
    del bits, group_size
    act = _ACT_NAMES.get(act_dtype, str(act_dtype))
    dev = torch.device(device)
    sms = _sm_count(dev.index or 0) if dev.type == "cuda" else 108
    ms = (m,) if m is not None else (1, 16, 32, 64, 256, 2048)
    names = dict.fromkeys(config_name(choose_config(mm, n, k, act, sms).config) for mm in ms)
    where = "sm80 path, epilogue per-channel scale" if layout == LAYOUT_ROWSCALE else \
        "sm80 path, reference (group-wise kernel TODO)"
    prefix = "cutlass" if m is not None else "cutlass by M:"
    return f"{prefix} {', '.join(names)} ({where})"


def prepare_weight(q_nk: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, signed: bool, group_size: int, zero_mode: str, layout: str,
                   act_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q [N, K] integers, scales [N, K/g], zeros [N, K/g] | None) -> this layout's operands.

    Runs once at compile time, on whatever device q_nk is on (torch only).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"not a {__name__} layout: {layout!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k = q_nk.shape
    if k % 2 or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size} must divide K={k} (K even)")
    groups = k // group_size
    if not signed and bits == 8 and q_nk.dtype == torch.int8:
        q_nk = q_nk.view(torch.uint8)  # unsigned bytes handed over in an int8 tensor
    q = q_nk.to(torch.int16)
    lo, hi = _range(bits, signed)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"q values outside the {kind} {bits}-bit range [{lo}, {hi}]")
    off = 0 if signed else 1 << (bits - 1)
    qweight = pack_signed(q - off, bits)
    s = scales.reshape(n, groups).to(torch.float32)
    if layout == LAYOUT_ROWSCALE:
        if _layout_for(bits, signed, group_size, zero_mode, k) != LAYOUT_ROWSCALE:
            raise ValueError("the rowscale layout takes signed int8 per-channel weights without zeros")
        return qweight, s.reshape(n).contiguous(), None
    if zero_mode == "none":
        z = off * s
    else:
        if zeros is None:
            raise ValueError(f"zero_mode={zero_mode!r} needs zeros")
        z0 = zeros.reshape(n, groups).to(torch.float32)
        z = (off - z0) * s if zero_mode == "sub" else off * s + z0
    return qweight, s.t().contiguous().to(act_dtype), z.t().contiguous().to(act_dtype)


def unprepare_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, signed: bool, zero_mode: str, layout: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`prepare_weight`, for tests: (q int16 [N, K] in the original signed
    or unsigned range, scales float32 [N, K/g], zeros float32 [N, K/g] or None).

    q is recovered exactly; scales exactly when the activation dtype holds them; zeros up
    to the rounding of z' in that dtype (z' = (off - z) * s for "sub").
    """
    if layout not in LAYOUTS:
        raise ValueError(f"not a {__name__} layout: {layout!r}")
    off = 0 if signed else 1 << (bits - 1)
    q = unpack_signed(qweight, bits).to(torch.int16) + off
    n = q.shape[0]
    if layout == LAYOUT_ROWSCALE:
        return q, scales.to(torch.float32).reshape(n, 1), None
    s = scales.to(torch.float32).t().contiguous()
    zp = zeros.to(torch.float32).t().contiguous()
    if zero_mode == "none":
        return q, s, None
    if zero_mode == "sub":
        return q, s, off - zp / s
    return q, s, zp - off * s


def reference_prepared(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                       group_size: int, layout: str) -> torch.Tensor:
    """Plain-PyTorch mixed_gemm on this family's layouts (the fallback when the kernel can't)."""
    q = unpack_signed(qweight, bits).to(torch.float32)
    return mixed_gemm.linear_folded(x, q, scales, zeros, bias, group_size,
                                    layout == LAYOUT_ROWSCALE)


# --- the kernel call ---------------------------------------------------------------------

_libs: dict[MixedGemmSm80Config, ctypes.CDLL] = {}
_lib_lock = threading.Lock()
_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64


def _spec(cfg: MixedGemmSm80Config):
    from .build import KernelSpec
    return KernelSpec(SOURCE, cfg.defines(), ARCH)


def build_all(configs=CONFIGS) -> None:
    """Compile (in parallel) every config not yet in the cache."""
    from .build import build_many
    build_many([_spec(c) for c in configs])


def _lib(cfg: MixedGemmSm80Config) -> ctypes.CDLL:
    lib = _libs.get(cfg)
    if lib is not None:
        return lib
    from .build import KernelBuildError, load
    with _lib_lock:
        lib = load(_spec(cfg))
        lib.qc_mixed_gemm_sm80.restype = _I
        lib.qc_mixed_gemm_sm80.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P, _I64, _P]
        lib.qc_mixed_gemm_sm80_workspace_size.restype = _I64
        lib.qc_mixed_gemm_sm80_workspace_size.argtypes = [_I] * 5
        info = (ctypes.c_int * 8)()
        lib.qc_mixed_gemm_sm80_info(info, 8)
        if list(info) != cfg.info():
            raise KernelBuildError(f"library for {config_name(cfg)} reports {list(info)}, "
                                   f"expected {cfg.info()}")
        _libs[cfg] = lib
        return lib


@functools.lru_cache(maxsize=4096)
def _workspace_bytes(cfg: MixedGemmSm80Config, m: int, n: int, k: int, decomp: int, splits: int,
                     device: int) -> int:
    del device  # part of the key: the stream-K split depends on the device's SM count
    nbytes = _lib(cfg).qc_mixed_gemm_sm80_workspace_size(m, n, k, decomp, splits)
    if nbytes < 0:
        raise RuntimeError("qc_mixed_gemm_sm80_workspace_size failed (no CUDA device?)")
    return int(nbytes)


@functools.lru_cache(maxsize=16)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
             group_size: int, layout: str) -> bool:
    """Whether the kernel runs this call (else the impl falls back to PyTorch)."""
    del group_size
    if layout not in KERNEL_LAYOUTS or bits != 8 or not x.is_cuda or x.dtype not in _ACT_NAMES:
        return False
    if not _arch_ok(torch.cuda.get_device_capability(x.device)):
        return False
    n, k = qweight.shape[0], x.shape[-1]
    return not (n % N_ALIGN or k % K_ALIGN or x.numel() == 0 or scales.numel() != n)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # cp.async and the epilogue's vector loads need 16-byte aligned, densely packed operands.
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"mixed_gemm_sm80_cuda: {msg}")


def mixed_gemm_sm80_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                         signed: bool, group_size: int, zero_mode: str, layout: str,
                         config: MixedGemmSm80Config | Choice | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the CUTLASS 2.x kernel: x [..., K] (bf16/fp16) -> [..., N] in x.dtype.

    ``signed``/``zero_mode``/``group_size`` describe the original format; prepare_weight
    folded them in. ``out`` (optional, [M, N] contiguous, x.dtype) receives the result.
    No host syncs: safe to capture in a CUDA graph.
    """
    del signed, zero_mode, group_size
    _check(layout in KERNEL_LAYOUTS, f"layout {layout!r} has no kernel (kernel layouts: {KERNEL_LAYOUTS})")
    _check(x.is_cuda, "x must be a CUDA tensor")
    _check(x.dtype in _ACT_NAMES, f"x must be bfloat16 or float16, got {x.dtype}")
    _check(bits == 8, f"bits must be 8, got {bits}")
    act = _ACT_NAMES[x.dtype]
    k = x.shape[-1]
    n = qweight.shape[0]
    _check(qweight.dtype == torch.int8 and tuple(qweight.shape) == (n, k),
           f"qweight must be int8 [N, {k}], got {qweight.dtype} {tuple(qweight.shape)}")
    _check(n % N_ALIGN == 0, f"N={n} must be a multiple of {N_ALIGN}")
    _check(k % K_ALIGN == 0, f"K={k} must be a multiple of {K_ALIGN}")
    _check(scales.dtype == torch.float32 and scales.numel() == n,
           f"rowscale layout wants float32 scales [N={n}], got {scales.dtype} {tuple(scales.shape)}")
    _check(zeros is None, "rowscale layout takes no zeros")
    for name, t in (("qweight", qweight), ("scales", scales), ("bias", bias)):
        _check(t is None or t.device == x.device,
               f"{name} is on {t.device if t is not None else ''}, x on {x.device}")

    lead = x.shape[:-1]
    x2 = _aligned(x.reshape(-1, k))
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        _check(out.dtype == x.dtype and tuple(out.shape) == (m, n) and out.is_contiguous()
               and out.device == x.device and out.data_ptr() % 16 == 0,
               f"out must be a contiguous, 16-byte aligned {x.dtype} [{m}, {n}] tensor on {x.device}")
    if m == 0:
        return out.reshape(*lead, n)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if config is None:
        config = choose_config(m, n, k, act, _sm_count(dev))
    choice = config if isinstance(config, Choice) else Choice(config)
    cfg = choice.config
    _check(cfg.act == act, f"config {config_name(cfg)} is for {cfg.act}, x is {act}")
    qweight, scales = _aligned(qweight), _aligned(scales.reshape(n))
    if bias is not None:
        _check(bias.numel() == n, f"bias must have N={n} elements, got {bias.numel()}")
        bias = _aligned(bias.reshape(n).to(x.dtype))
    if dev != torch.cuda.current_device():
        # the library launches on (and sizes its workspace for) the current device
        with torch.cuda.device(dev):
            return mixed_gemm_sm80_cuda(x, qweight, scales, None, bias, 8, True, k, "none", layout,
                                        choice, out).reshape(*lead, n)
    lib = _lib(cfg)
    ws_bytes = _workspace_bytes(cfg, m, n, k, choice.decomposition, choice.splits, dev)
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = lib.qc_mixed_gemm_sm80(
        x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(),
        m, n, k, choice.decomposition, choice.splits, ws.data_ptr(), ws_bytes, stream)
    if rc != 0:
        raise RuntimeError(f"qc_mixed_gemm_sm80 ({config_name(cfg)}, M={m} N={n} K={k}) "
                           f"failed with CUDA error {rc}")
    return out.reshape(*lead, n)


# --- op registration (call only once the GPU tests pass) ---------------------------------

_registered = False
_warned: set[str] = set()


def _cuda_impl(x, qweight, scales, zeros, bias, bits, signed, group_size, zero_mode,
               dequant_dtype, layout):
    if layout not in LAYOUTS:
        # another family's layout: hand over to the Hopper family's impl, which dispatches
        # its own layouts and sends everything else to the reference
        return mixed_gemm._cuda_impl(x, qweight, scales, zeros, bias, bits, signed, group_size,
                                     zero_mode, dequant_dtype, layout)
    if supports(x, qweight, scales, bits, group_size, layout):
        from .build import KernelBuildError
        try:
            return mixed_gemm_sm80_cuda(x, qweight, scales, zeros, bias, bits, signed,
                                        group_size, zero_mode, layout)
        except KernelBuildError as e:
            if "build" not in _warned:
                _warned.add("build")
                log.warning("CUTLASS sm80 mixed GEMM unavailable, using PyTorch: %s", e)
    return reference_prepared(x, qweight, scales, zeros, bias, bits, group_size, layout)


def register_cuda_impl() -> None:
    """Make this family (and, for their layouts, the Hopper family) the CUDA implementation
    of ``qcompile::mixed_gemm`` (idempotent). Not called anywhere yet: see the module docstring."""
    global _registered
    if not _registered:
        import qcompile.kernels.ops  # noqa: F401  (defines the op)
        torch.library.register_kernel("qcompile::mixed_gemm", "cuda", _cuda_impl)
        _registered = True
