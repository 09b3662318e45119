r"""Ampere-class mixed-input GEMM (bf16/fp16 activations x int4/int8 weights) for
``qcompile::mixed_gemm``: sm_80 code, so it runs on A100/A10/L4/L40S/RTX 30-40 and (as
sm_90 machine code built from the same PTX) on an H100 as one more candidate.

Validation so far: ``tests/gpu/test_mixed_gemm_sm80_cuda.py`` passed on one H100 (the sm_90
machine code built from the sm_80 PTX), and compute-sanitizer memcheck / racecheck found
nothing in the group-wise kernel there. Never run on an 8.x (Ampere/Ada) GPU.

What is here: configurations (data), :func:`choose_config` (the one heuristic), the named
choices the autotuner times (:func:`candidates`, :func:`choice_name`), the offline weight
preparation in torch (:func:`prepare_weight` / :func:`unprepare_weight`), the ctypes calls
into the two CUDA sources. ``qcompile.kernels.run_family`` is the op's CUDA body for this
family's layouts (the package dispatches to it by layout; this module registers nothing).
Everything the kernels cannot take runs the plain-PyTorch :func:`reference_prepared`.

Layouts (the op's ``layout`` argument):

- ``sm80_mixed_v1_rowscale`` (kernel ``csrc/mixed_gemm_sm80.cu``, CUTLASS 2.x): signed int8
  per-channel weights without zeros. ``qweight`` int8 [N, K] (W row-major = CUTLASS's B
  column-major); ``scales`` float32 [N], applied in the epilogue; ``zeros`` None. Main loop:
  CUTLASS's multistage cp.async MMA with ``OpMultiplyAddMixedInputUpcast`` (int8 tiles
  through shared memory, bias-trick converters, 16-bit ``mma.sync``); stream-K swizzle for
  split-K. Alignment N % 8, K % 16.
- ``sm80_mixed_v2_groupzero`` (kernel ``csrc/mixed_gemm_gz_sm80.cu``, written on the sm_80
  primitives: cp.async, ldmatrix, mma.sync.m16n8k16): everything else -- int4 or int8,
  signed or unsigned, zeros "none"/"sub"/"add", group size g in {16, 32} or any multiple of
  64 (per-channel is g = K). ``scales`` s and ``zeros`` z' are [K/g, N] in the activation
  dtype and W = q' * s + z' with q' = q - 2**(bits-1) for unsigned formats (q for signed):
  z' folds the shift and the zero mode in ("none": z' = off*s, "sub": (off - z)*s, "add":
  off*s + z), as in the Hopper family's groupzero layout. Scales and zeros ride the same
  cp.async stage as the operands and are applied in registers, after the int->float
  conversion and before each ``mma.sync``. Alignment: K % 64, N % 16 (int4) / N % 8 (int8).
- ``sm80_mixed_v1_groupzero``: the earlier group-wise format (q' in plain [N, K] order, the
  reference's nibble order); no kernel, kept so that weights prepared with it still run
  (PyTorch). :func:`select_layout` never returns it.

The v2 weight layout. qweight is uint8 [N, K * bits / 8] holding u = q' + 2**(bits-1) (the
biased, unsigned value: for unsigned formats simply the original q), cut into 512-byte
blocks. A block covers 16 rows n x 64 k (int4) or 8 rows x 64 k (int8); block (nb, kb) is at
byte (nb * K/64 + kb) * 512, so the rows of a block stay rows of qweight, and one CTA's K
tile of TN rows is TN/16 (TN/8) whole blocks: plain 16-byte cp.async copies, no swizzle.
Inside a block, lane l = 4*g + t of a warp owns bytes 16l .. 16l+15: exactly the values
its ``mma.sync.m16n8k16`` B fragments need for the block's four 16-deep k-steps (a B
fragment register of lane (g, t) holds n = g, k = 2t, 2t+1; the second one k = 2t+8,
2t+9). 32-bit word ks of a lane serves k-step ks (k = 64 kb + 16 ks + ...)::

    int4 block (16 n x 64 k), lane (g, t), word ks = 8 nibbles, nibble p at bits 4p..4p+3:

        nibble p :   0      1      2      3      4      5      6      7
        n        :   g      g      g+8    g+8    g      g      g+8    g+8
        k - 16ks :   2t     2t+8   2t     2t+8   2t+1   2t+9   2t+1   2t+9
                   \_ pair (0,4) = reg b0 of n8 col 0 _/  (1,5) = b1 col 0, (2,6) = b0 col 1,
                                                          (3,7) = b1 col 1

        (w >> 4i) & 0x000f000f puts nibbles i and i+4 in the two 16-bit halves: one lop3
        with the magic exponent (0x6400 fp16 / 0x4300 bf16) makes the half2 1024 + u
        (128 + u) and one sub (fma for bf16) gives q' -- a whole B register, no shuffle.

    int8 block (8 n x 64 k), lane (g, t), word ks = 4 bytes:

        byte     :   0      1      2      3
        k - 16ks :   2t     2t+8   2t+1   2t+9          (n = g)
        prmt 0x5250 / 0x5351 -> bytes (0, 2) = b0, (1, 3) = b1

    memory:  [ block (0,0) | block (0,1) | ... | block (0,K/64-1) | block (1,0) | ... ]
              \_ lane 0: 16 B _/\_ lane 1 _/ ... \_ lane 31 _/   (512 B per block)

:func:`v2_order` is that permutation as one torch ``permute``; :func:`pack_v2` /
:func:`unpack_v2` apply / invert it.
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
from . import mixed_gemm_decode as decode

log = logging.getLogger("qcompile.kernels")

__all__ = [
    "CONFIGS",
    "KERNEL_LAYOUTS",
    "LAYOUT_GROUPZERO",
    "LAYOUT_GROUPZERO_V2",
    "LAYOUT_ROWSCALE",
    "LAYOUTS",
    "Choice",
    "MixedGemmSm80Config",
    "build_all",
    "candidates",
    "choice_from_name",
    "choice_name",
    "choose_config",
    "heuristic_choice",
    "config_name",
    "describe",
    "mixed_gemm_cuda",
    "mixed_gemm_sm80_cuda",
    "pack_v2",
    "prepare_weight",
    "reference_prepared",
    "select_layout",
    "supports",
    "unpack_v2",
    "unprepare_weight",
    "v2_order",
]

SOURCE = "mixed_gemm_sm80.cu"        # CUTLASS 2.x, rowscale
SOURCE_GZ = "mixed_gemm_gz_sm80.cu"  # sm_80 primitives, group-wise scale + zero
ARCH = "sm_80"
LAYOUT_ROWSCALE = "sm80_mixed_v1_rowscale"
LAYOUT_GROUPZERO = "sm80_mixed_v1_groupzero"
LAYOUT_GROUPZERO_V2 = "sm80_mixed_v2_groupzero"
LAYOUTS = (LAYOUT_ROWSCALE, LAYOUT_GROUPZERO, LAYOUT_GROUPZERO_V2)
KERNEL_LAYOUTS = (LAYOUT_ROWSCALE, LAYOUT_GROUPZERO_V2)  # the layouts a CUDA kernel runs
_MODE_OF_LAYOUT = {LAYOUT_ROWSCALE: "rs", LAYOUT_GROUPZERO_V2: "gz"}

# rowscale alignment: K in 16-byte chunks of int8 (and 8-element cp.async of x); N a multiple
# of 8 for the 16-byte epilogue stores. The v1 formats themselves (torch) take any N, K even.
K_ALIGN = 16
N_ALIGN = 8
# v2: K in whole 64-deep K tiles; N in whole weight blocks (16 rows int4, 8 rows int8)
TILE_K = 64
K_ALIGN_V2 = 64
N_ALIGN_V2 = {4: 16, 8: 8}

_ACT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# decomposition argument (same numbering as the Hopper family). The group-wise kernel has
# data-parallel and split-K only; the CUTLASS rowscale kernel also stream-K / its heuristic.
DECOMP_HEURISTIC, DECOMP_DATA_PARALLEL, DECOMP_SPLIT_K, DECOMP_STREAM_K = 0, 1, 2, 3


@dataclass(frozen=True)
class MixedGemmSm80Config:
    """One compiled kernel (all fields are -D defines of its source).

    tile: CTA tile (tokens M, output channels N, K); warp: warp tile (tile / warp = the
    warps per CTA); stages: cp.async pipeline depth; bits: weight bits; mode: "rs" (CUTLASS
    rowscale kernel, int8) or "gz" (group-wise scale + zero kernel, int4 / int8).
    """

    act: str                      # "bf16" | "fp16"
    tile: tuple[int, int, int]
    warp: tuple[int, int, int]
    stages: int
    bits: int = 8
    mode: str = "rs"

    @property
    def source(self) -> str:
        return SOURCE if self.mode == "rs" else SOURCE_GZ

    @property
    def warps(self) -> tuple[int, int]:
        return self.tile[0] // self.warp[0], self.tile[1] // self.warp[1]

    def defines(self) -> dict[str, int]:
        if self.mode == "rs":
            return {
                "QC_ACT_FP16": int(self.act == "fp16"),
                "QC_TILE_M": self.tile[0], "QC_TILE_N": self.tile[1], "QC_TILE_K": self.tile[2],
                "QC_WARP_M": self.warp[0], "QC_WARP_N": self.warp[1], "QC_WARP_K": self.warp[2],
                "QC_STAGES": self.stages,
            }
        return {
            "QC_ACT_FP16": int(self.act == "fp16"), "QC_WBITS": self.bits,
            "QC_TILE_M": self.tile[0], "QC_TILE_N": self.tile[1],
            "QC_WARPS_M": self.warps[0], "QC_WARPS_N": self.warps[1], "QC_STAGES": self.stages,
        }

    def info(self) -> list[int]:
        """What the library's info function must report (its first 8 values)."""
        if self.mode == "rs":
            return [int(self.act == "fp16"), *self.tile, *self.warp, self.stages]
        return [int(self.act == "fp16"), self.bits, self.tile[0], self.tile[1], self.tile[2],
                *self.warps, self.stages]

    def smem_bytes(self) -> int:
        """Pipeline shared memory of the group-wise kernel (x + weight + 4 scale/zero rows)."""
        tm, tn, tk = self.tile
        return self.stages * (tm * tk * 2 + tn * tk * self.bits // 8 + 2 * 4 * tn * 2)


def config_name(cfg: MixedGemmSm80Config) -> str:
    """Short readable name, e.g. ``sm80.bf16.w4.gz.16x128x64.s4``."""
    m, n, k = cfg.tile
    return f"sm80.{cfg.act}.w{cfg.bits}.{cfg.mode}.{m}x{n}x{k}.s{cfg.stages}"


# Rowscale (CUTLASS): token tiles 16 / 32 for decode, 64 / 128 for prefill, 128 output
# channels per CTA. No build spills registers (ptxas -v); the 128x128 tile uses 8 warps of
# 64x32 because 4 warps of 64x64 need 255 registers and spill in fp16 (docs/design.md).
_RS_TILES = (
    ((16, 128, 64), (16, 32, 64), 5),
    ((32, 128, 64), (32, 32, 64), 4),
    ((64, 128, 64), (32, 64, 64), 4),
    ((128, 128, 64), (64, 32, 64), 4),
)
# Group-wise (csrc/mixed_gemm_gz_sm80.cu): the same token tiles; 4 warps (8 for 128x128).
# Shared memory per CTA (int4 / int8): 16x128 s4 32 / 48 KiB, 32x128 s4 40 / 56, 64x128
# s4 56 / 72, 128x128 s3 66 / 78 -- within sm_86/89's 99 KiB.
# No build spills registers (ptxas -v) thanks to ``__launch_bounds__(threads, 1)``: without
# the 1, ptxas capped the sm_90 code of 16x128 w4 too low and spilled (docs/design.md).
_GZ_TILES = (
    ((16, 128, 64), (16, 32, 64), 4),
    ((32, 128, 64), (32, 32, 64), 4),
    ((64, 128, 64), (32, 64, 64), 4),
    ((128, 128, 64), (64, 32, 64), 3),
)
CONFIGS: tuple[MixedGemmSm80Config, ...] = tuple(
    MixedGemmSm80Config(act, tile, warp, stages)
    for act in ("bf16", "fp16") for tile, warp, stages in _RS_TILES
) + tuple(
    MixedGemmSm80Config(act, tile, warp, stages, bits, "gz")
    for act in ("bf16", "fp16") for bits in (4, 8) for tile, warp, stages in _GZ_TILES
)


@dataclass(frozen=True)
class Choice:
    """A config plus how the work is split for one call (split-K factor)."""

    config: MixedGemmSm80Config
    decomposition: int = DECOMP_DATA_PARALLEL
    splits: int = 1


def _family(act: str, bits: int = 8, mode: str = "rs") -> list[MixedGemmSm80Config]:
    return sorted((c for c in CONFIGS if (c.act, c.bits, c.mode) == (act, bits, mode)),
                  key=lambda c: c.tile[0])


def choose_config(m: int, n: int, k: int, act: str, sm_count: int = 108, bits: int = 8,
                  mode: str = "rs") -> Choice:
    """Pick the kernel for out[m, n] = x[m, k] @ W[n, k].T.

    Rowscale (the Hopper family's rules, which beat dense bf16 at decode here too): the
    smallest token tile that holds m for m <= 64; beyond, the widest tile that still gives
    at least half the SMs a tile. When the output tiles leave SMs idle (decode: 4096 channels are 32 tiles of 128),
    K is split over about sm_count / tiles CTAs, keeping at least 8 K tiles (512) per split.

    Group-wise (timed only as the sm_90 code of this source on a Hopper GPU): the 16-token
    tile for m <= 16 and the 32-token tile up to m = 64 (the 64-token tile was much slower
    at m = 64: its two warp rows convert the same weights twice); for m <= 64 split-K over
    about 4 CTAs per SM (several small CTAs fit an SM, and a weight stream needs many in
    flight; beyond, 1 per SM), at most 8 ways: faster than fewer splits, data-parallel and
    dense bf16 where timed. Prefill as rowscale (on Hopper far slower than dense bf16, since
    sm_80 code has no wgmma; there the Hopper family is the one to use). docs/design.md
    has the figures.
    """
    family = _family(act, bits, mode)
    if not family:
        raise ValueError(f"no sm80 mixed-GEMM config for act={act} bits={bits} mode={mode}")
    if m <= 64:
        want = m if mode == "rs" else (16 if m <= 16 else 32)
        cfg = next((c for c in family if c.tile[0] >= want), family[-1])
    else:
        wide = [c for c in family if c.tile[0] >= 64] or family
        cfg = wide[0]
        for c in reversed(wide):
            if math.ceil(n / c.tile[1]) * math.ceil(m / c.tile[0]) >= sm_count // 2:
                cfg = c
                break
    tiles = math.ceil(n / cfg.tile[1]) * math.ceil(m / cfg.tile[0])
    k_tiles = math.ceil(k / cfg.tile[2])
    if mode == "rs":
        splits = min(sm_count // max(tiles, 1), k_tiles // 8, 16)
    else:
        ctas_per_sm = 4 if m <= 64 else 1  # decode: several small CTAs share an SM
        splits = min(ctas_per_sm * sm_count // max(tiles, 1), k_tiles // 8, 8)
    if splits >= 2:
        return Choice(cfg, DECOMP_SPLIT_K, splits)
    return Choice(cfg, DECOMP_DATA_PARALLEL, 1)


_DECOMP_SUFFIX = {DECOMP_DATA_PARALLEL: "dp", DECOMP_STREAM_K: "streamk", DECOMP_HEURISTIC: "auto"}


# Token counts up to which the heuristic runs the decode kernel (mixed_gemm_decode) on the v2
# layout instead of the group-wise GEMM: a weight stream wants more bytes in flight than the
# GEMM's shared-memory pipeline keeps. Timed only as sm_90 code on Hopper, where it beat the
# group-wise GEMM (docs/design.md); the same limit as the Hopper family, where it also won
# end to end.
DECODE_MAX_M = 8
_DECODE_GROUPZERO = {act: {bits: decode.DecodeBuild(act, bits, decode.LAYOUT_SM80_V2,
                                                    decode.MODE_GROUPZERO) for bits in (4, 8)}
                     for act in ("bf16", "fp16")}


def _decode_fits(m: int, n: int, k: int, mode: str, group_size: int | None) -> bool:
    return mode == "gz" and decode.fits(m, n, k, group_size or k, decode.MODE_GROUPZERO)


def heuristic_choice(m: int, n: int, k: int, act: str, sm_count: int = 108, bits: int = 8,
                     mode: str = "rs", group_size: int | None = None
                     ) -> Choice | decode.DecodeChoice:
    """The kernel for m tokens without measurements: the decode kernel up to DECODE_MAX_M
    tokens where it takes the format (v2 layout, group a multiple of 64), else
    :func:`choose_config`."""
    if m <= DECODE_MAX_M and _decode_fits(m, n, k, mode, group_size):
        return decode.heuristic(m, n, k, sm_count)
    return choose_config(m, n, k, act, sm_count, bits, mode)


def choice_name(choice: Choice | decode.DecodeChoice) -> str:
    """The stable, unique name of a choice, e.g. ``sm80.bf16.w4.gz.16x128x64.s4/sk4``
    (split-K into 4) or ``.../dp`` (data-parallel); rowscale also ``/streamk``, ``/auto``;
    decode-kernel choices ``decode.t8.r16.w8``."""
    if isinstance(choice, decode.DecodeChoice):
        return choice.name
    name = config_name(choice.config)
    if choice.decomposition == DECOMP_SPLIT_K and choice.splits >= 2:
        return f"{name}/sk{choice.splits}"
    if choice.decomposition == DECOMP_SPLIT_K:
        return f"{name}/dp"
    return f"{name}/{_DECOMP_SUFFIX[choice.decomposition]}"


@functools.cache
def _configs_by_name() -> dict[str, MixedGemmSm80Config]:
    return {config_name(c): c for c in CONFIGS}


def choice_from_name(name: str) -> Choice | decode.DecodeChoice:
    """Inverse of :func:`choice_name`; ValueError for a name this family does not have."""
    if decode.is_name(name):
        return decode.choice_from_name(name)
    base, _, split = name.partition("/")
    cfg = _configs_by_name().get(base)
    if cfg is not None:
        if not split or split == "dp":
            return Choice(cfg)
        if split.startswith("sk") and split[2:].isdigit() and int(split[2:]) >= 2:
            return Choice(cfg, DECOMP_SPLIT_K, int(split[2:]))
        if cfg.mode == "rs" and split == "streamk":
            return Choice(cfg, DECOMP_STREAM_K)
        if cfg.mode == "rs" and split == "auto":
            return Choice(cfg, DECOMP_HEURISTIC)
    raise ValueError(f"no sm80 mixed-GEMM choice named {name!r}")


def candidates(m: int, n: int, k: int, act: str, bits: int, group_size: int, layout: str,
               sm_count: int = 108) -> list[str]:
    """Choices worth timing for one problem: the heuristic's first, the decode kernel's
    launch shapes (v2 layout, m <= its limit), then (at most 8 GEMM choices) the token tiles
    that fit m (decode: 16 / 32; prefill: 64 / 128), each data-parallel and, where the output
    tiles leave SMs idle, split-K 2 / 4 / 8 ways (>= 4 K tiles a split)."""
    mode = _MODE_OF_LAYOUT.get(layout)
    if mode is None:
        return []
    family = _family(act, bits, mode)
    if not family:
        return []
    first = choice_name(heuristic_choice(m, n, k, act, sm_count, bits, mode, group_size))
    decode_names = decode.candidates(m, n, k, sm_count) if _decode_fits(m, n, k, mode, group_size) else []
    names = [choice_name(choose_config(m, n, k, act, sm_count, bits, mode))]
    smallest_fit = next((c.tile[0] for c in family if c.tile[0] >= m), family[-1].tile[0])
    if m <= 64:
        tiles_m = [c for c in family if c.tile[0] <= max(smallest_fit, 32)]
    else:
        tiles_m = [c for c in family if c.tile[0] >= 64]
    k_tiles = k // TILE_K
    for cfg in tiles_m:
        names.append(choice_name(Choice(cfg)))
        tiles = math.ceil(n / cfg.tile[1]) * math.ceil(m / cfg.tile[0])
        if tiles < sm_count:
            for s in (2, 4, 8):
                if k_tiles >= 4 * s:
                    names.append(choice_name(Choice(cfg, DECOMP_SPLIT_K, s)))
    return list(dict.fromkeys([first, *decode_names, *list(dict.fromkeys(names))[:8]]))


# --- weight preparation (torch; runs on CPU or GPU) -------------------------------------

def _range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _is_rowscale(bits: int, signed: bool, group_size: int, zero_mode: str, k: int) -> bool:
    return bits == 8 and signed and zero_mode == "none" and group_size == k


def group_ok(group_size: int, k: int) -> bool:
    """Group sizes the v2 kernel takes: 16 / 32 (several groups per 64-deep K tile) or a
    multiple of 64 (one group for one or more K tiles), dividing K."""
    if group_size <= 0 or k % group_size or group_size % 16:
        return False
    return TILE_K % group_size == 0 or group_size % TILE_K == 0


def v2_shape_ok(bits: int, n: int, k: int, group_size: int) -> bool:
    """Whether (N, K, g) fit the v2 layout / kernel."""
    return (bits in N_ALIGN_V2 and n > 0 and k > 0 and n % N_ALIGN_V2[bits] == 0
            and k % K_ALIGN_V2 == 0 and group_ok(group_size, k))


def pack_signed(q: torch.Tensor, bits: int) -> torch.Tensor:
    """v1: signed values q [N, K] (in range) -> qweight: int8 [N, K], or uint8 [N, K/2] for
    int4 (element k in the low nibble of byte k//2 when k is even: ``cutlass::int4b_t`` order)."""
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


# v2: q [N, K] viewed with n = 16 nb + 8 nh + g (int4; int8: n = 8 nb + g) and
# k = 64 kb + 16 ks + 8 kh + 2 t + kl; memory order slowest to fastest below (the block,
# then the lane (g, t), then its word ks, then the position in the word).
_V2_AXES = {4: ("nb", "nh", "g", "kb", "ks", "kh", "t", "kl"),
            8: ("nb", "g", "kb", "ks", "kh", "t", "kl")}
_V2_DEST = {4: ("nb", "kb", "g", "t", "ks", "kl", "nh", "kh"),
            8: ("nb", "kb", "g", "t", "ks", "kl", "kh")}


def _v2_dims(bits: int, n: int, k: int) -> dict[str, int]:
    dims = {"nb": n // N_ALIGN_V2[bits], "g": 8, "kb": k // 64, "ks": 4, "kh": 2, "t": 4, "kl": 2}
    if bits == 4:
        dims["nh"] = 2
    return dims


def v2_order(t: torch.Tensor, bits: int) -> torch.Tensor:
    """The elements of t [N, K] (any dtype) flattened in the v2 kernel's memory order."""
    n, k = t.shape
    if bits not in N_ALIGN_V2 or n % N_ALIGN_V2[bits] or k % K_ALIGN_V2:
        raise ValueError(f"the v2 layout needs N % {N_ALIGN_V2.get(bits)} == 0 and K % 64 == 0 "
                         f"(bits={bits}), got N={n}, K={k}")
    dims = _v2_dims(bits, n, k)
    src = _V2_AXES[bits]
    t = t.reshape([dims[a] for a in src]).permute([src.index(a) for a in _V2_DEST[bits]])
    return t.contiguous().reshape(-1)


def pack_v2(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values q' [N, K] (in range) -> v2 qweight uint8 [N, K * bits / 8] holding
    u = q' + 2**(bits-1) in the kernel's order (int4: offset o in byte o // 2, low nibble
    when o is even)."""
    n, k = q.shape
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    flat = v2_order(u, bits)
    if bits == 8:
        return flat.reshape(n, k)
    return (flat[0::2] | (flat[1::2] << 4)).reshape(n, k // 2)


def unpack_v2(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_v2`: the signed values q' as int8 [N, K]."""
    n = qweight.shape[0]
    k = qweight.shape[1] * 8 // bits
    flat = qweight.reshape(-1).view(torch.uint8)
    if bits == 4:
        flat = torch.stack((flat & 0xF, flat >> 4), dim=-1).reshape(-1)
    dims = _v2_dims(bits, n, k)
    dest = _V2_DEST[bits]
    inv = [dest.index(a) for a in _V2_AXES[bits]]
    u = flat.reshape([dims[a] for a in dest]).permute(inv).reshape(n, k)
    return (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _arch_ok(capability: tuple[int, int]) -> bool:
    # The libraries hold sm_80 and sm_90 machine code (build.py), no PTX: 8.x and 9.0 only.
    return capability[0] == 8 or capability == (9, 0)


def select_layout(bits: int, signed: bool, group_size: int, zero_mode: str, n: int, k: int,
                  act_dtype: torch.dtype, device: torch.device | str) -> str | None:
    """This family's layout for a weight format, or None if its kernels cannot run it.

    Signed int8 per-channel without zeros: ``sm80_mixed_v1_rowscale`` (N % 8, K % 16);
    everything else int4 / int8: ``sm80_mixed_v2_groupzero`` (K % 64, N % 16 for int4 /
    N % 8 for int8, g in {16, 32} or a multiple of 64 dividing K). Builds (or finds cached)
    the kernels, so a missing toolchain shows up here as KernelBuildError, before the weight
    is packed for a kernel that cannot run.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if not _arch_ok(torch.cuda.get_device_capability(device)):
        return None
    if act_dtype not in _ACT_NAMES or zero_mode not in ops.ZERO_MODES or bits not in (4, 8):
        return None
    if group_size <= 0 or k <= 0 or k % group_size:
        return None
    act = _ACT_NAMES[act_dtype]
    if _is_rowscale(bits, signed, group_size, zero_mode, k):
        if n % N_ALIGN or k % K_ALIGN:
            return None
        build_all(_family(act, 8, "rs"))
        return LAYOUT_ROWSCALE
    if not v2_shape_ok(bits, n, k, group_size):
        return None
    from .build import build_many
    build_many([kernel_spec(c) for c in _family(act, bits, "gz")]
               + [decode.kernel_spec(_DECODE_GROUPZERO[act][bits])])
    return LAYOUT_GROUPZERO_V2


def describe(layout: str, m: int | None, n: int, k: int, act_dtype: torch.dtype,
             device: torch.device | str, bits: int = 8, group_size: int | None = None) -> str:
    """One line for the match report: ``cutlass sm80 <config(s) by M> (<where>)``."""
    act = _ACT_NAMES.get(act_dtype, str(act_dtype))
    dev = torch.device(device)
    sms = mixed_gemm.sm_count(dev.index or 0) if dev.type == "cuda" and torch.cuda.is_available() else 108
    mode = _MODE_OF_LAYOUT.get(layout)
    if mode is None:
        return "cutlass sm80 none: reference (PyTorch) for the legacy v1 group-wise layout"
    bits = 8 if mode == "rs" else bits
    ms = (m,) if m is not None else (1, 16, 32, 64, 256, 2048)
    names = dict.fromkeys(
        choice_name(heuristic_choice(mm, n, k, act, sms, bits, mode, group_size)) for mm in ms)
    where = "epilogue per-channel scale" if mode == "rs" else \
        f"main-loop group scale+zero, g={group_size}"
    if any(decode.is_name(name) for name in names):
        where += "; decode.*: qcompile's mma.sync decode kernel on this layout"
    prefix = "cutlass sm80" if m is not None else "cutlass sm80 by M:"
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
    if layout == LAYOUT_GROUPZERO_V2 and not v2_shape_ok(bits, n, k, group_size):
        raise ValueError(f"layout {layout} needs K % 64 == 0, N % {N_ALIGN_V2[bits]} == 0 and a "
                         f"group size of 16, 32 or a multiple of 64 dividing K; got N={n}, K={k}, "
                         f"g={group_size}")
    groups = k // group_size
    if not signed and bits == 8 and q_nk.dtype == torch.int8:
        q_nk = q_nk.view(torch.uint8)  # unsigned bytes handed over in an int8 tensor
    q = q_nk.to(torch.int16)
    lo, hi = _range(bits, signed)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"q values outside the {kind} {bits}-bit range [{lo}, {hi}]")
    off = 0 if signed else 1 << (bits - 1)
    s = scales.reshape(n, groups).to(torch.float32)
    if layout == LAYOUT_ROWSCALE:
        if not _is_rowscale(bits, signed, group_size, zero_mode, k):
            raise ValueError("the rowscale layout takes signed int8 per-channel weights without zeros")
        return pack_signed(q, bits), s.reshape(n).contiguous(), None
    qweight = pack_v2(q - off, bits) if layout == LAYOUT_GROUPZERO_V2 else pack_signed(q - off, bits)
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
    qs = unpack_v2(qweight, bits) if layout == LAYOUT_GROUPZERO_V2 else unpack_signed(qweight, bits)
    q = qs.to(torch.int16) + off
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
    qs = unpack_v2(qweight, bits) if layout == LAYOUT_GROUPZERO_V2 else unpack_signed(qweight, bits)
    return mixed_gemm.linear_folded(x, qs.to(torch.float32), scales, zeros, bias, group_size,
                                    layout == LAYOUT_ROWSCALE)


# --- the kernel calls ---------------------------------------------------------------------

_libs: dict[MixedGemmSm80Config, ctypes.CDLL] = {}
_lib_lock = threading.Lock()
_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64


def kernel_spec(cfg: MixedGemmSm80Config):
    """What the build cache compiles for one config (``qcompile build --arch sm_80`` too)."""
    from .build import KernelSpec
    return KernelSpec(cfg.source, cfg.defines(), ARCH)


def build_all(configs=CONFIGS) -> None:
    """Compile (in parallel) every config not yet in the cache."""
    from .build import build_many
    build_many([kernel_spec(c) for c in configs])


def _lib(cfg: MixedGemmSm80Config) -> ctypes.CDLL:
    lib = _libs.get(cfg)
    if lib is not None:
        return lib
    from .build import load_checked
    fn = "qc_mixed_gemm_sm80" if cfg.mode == "rs" else "qc_mixed_gemm_gz_sm80"
    # the group-wise (gz) kernel takes zeros and a group size; the rowscale one neither
    args, ws_args = (([_P] * 5 + [_I] * 5, 5) if cfg.mode == "rs" else ([_P] * 6 + [_I] * 5, 4))
    with _lib_lock:
        lib = load_checked(kernel_spec(cfg), {
            fn: (_I, args + [_P, _I64, _P]),
            f"{fn}_workspace_size": (_I64, [_I] * ws_args),
        }, info=(f"{fn}_info", cfg.info()))
        _libs[cfg] = lib
        return lib


@functools.lru_cache(maxsize=4096)
def _workspace_bytes(cfg: MixedGemmSm80Config, m: int, n: int, k: int, decomp: int, splits: int,
                     device: int) -> int:
    del device  # part of the key: the stream-K split depends on the device's SM count
    if cfg.mode == "gz":
        nbytes = _lib(cfg).qc_mixed_gemm_gz_sm80_workspace_size(
            m, n, k, splits if decomp == DECOMP_SPLIT_K else 1)
    else:
        nbytes = _lib(cfg).qc_mixed_gemm_sm80_workspace_size(m, n, k, decomp, splits)
    if nbytes < 0:
        raise RuntimeError("qc_mixed_gemm_sm80_workspace_size failed (no CUDA device?)")
    return int(nbytes)


def supports(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
             group_size: int, layout: str) -> bool:
    """Whether a kernel runs this call (else :func:`run` falls back to PyTorch)."""
    if layout not in KERNEL_LAYOUTS or not x.is_cuda or x.dtype not in _ACT_NAMES or x.numel() == 0:
        return False
    if not _arch_ok(torch.cuda.get_device_capability(x.device)):
        return False
    n, k = qweight.shape[0], x.shape[-1]
    if layout == LAYOUT_ROWSCALE:
        return bits == 8 and not (n % N_ALIGN or k % K_ALIGN or scales.numel() != n)
    return (scales.dtype == x.dtype and v2_shape_ok(bits, n, k, group_size)
            and qweight.dtype == torch.uint8 and tuple(qweight.shape) == (n, k * bits // 8))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"mixed_gemm_sm80_cuda: {msg}")


def mixed_gemm_sm80_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                         signed: bool, group_size: int, zero_mode: str, layout: str,
                         config: MixedGemmSm80Config | Choice | decode.DecodeChoice | str | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Run a kernel of this family: x [..., K] (bf16/fp16) -> [..., N] in x.dtype.

    ``signed`` / ``zero_mode`` describe the original format; prepare_weight folded them in.
    ``config``: None (heuristic), a Choice, a config, or a choice name. ``out`` (optional,
    [M, N] contiguous, x.dtype) receives the result. No host syncs: safe to capture in a
    CUDA graph.
    """
    del signed, zero_mode
    _check(layout in KERNEL_LAYOUTS, f"layout {layout!r} has no kernel (kernel layouts: {KERNEL_LAYOUTS})")
    _check(x.is_cuda, "x must be a CUDA tensor")
    _check(x.dtype in _ACT_NAMES, f"x must be bfloat16 or float16, got {x.dtype}")
    _check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    act = _ACT_NAMES[x.dtype]
    mode = _MODE_OF_LAYOUT[layout]
    k = x.shape[-1]
    n = qweight.shape[0]
    if mode == "rs":
        _check(bits == 8, f"the rowscale layout is int8, got bits={bits}")
        _check(qweight.dtype == torch.int8 and tuple(qweight.shape) == (n, k),
               f"qweight must be int8 [N, {k}], got {qweight.dtype} {tuple(qweight.shape)}")
        _check(n % N_ALIGN == 0, f"N={n} must be a multiple of {N_ALIGN}")
        _check(k % K_ALIGN == 0, f"K={k} must be a multiple of {K_ALIGN}")
        _check(scales.dtype == torch.float32 and scales.numel() == n,
               f"rowscale layout wants float32 scales [N={n}], got {scales.dtype} {tuple(scales.shape)}")
        _check(zeros is None, "rowscale layout takes no zeros")
    else:
        _check(qweight.dtype == torch.uint8 and tuple(qweight.shape) == (n, k * bits // 8),
               f"qweight must be uint8 [N, {k * bits // 8}] for K={k}, got {qweight.dtype} "
               f"{tuple(qweight.shape)}")
        _check(n % N_ALIGN_V2[bits] == 0, f"N={n} must be a multiple of {N_ALIGN_V2[bits]}")
        _check(k % K_ALIGN_V2 == 0, f"K={k} must be a multiple of {K_ALIGN_V2}")
        _check(group_ok(group_size, k), f"group_size={group_size} must divide K={k} and be 16, 32 "
               "or a multiple of 64")
        g = k // group_size
        _check(scales.dtype == x.dtype and tuple(scales.shape) == (g, n),
               f"groupzero layout wants scales {x.dtype} [{g}, {n}], got {scales.dtype} "
               f"{tuple(scales.shape)}")
        _check(zeros is not None and zeros.dtype == x.dtype and tuple(zeros.shape) == (g, n),
               f"groupzero layout wants zeros {x.dtype} [{g}, {n}]")
    lead, x2, out = mixed_gemm.stage_activation(
        "mixed_gemm_sm80_cuda", x, n, out,
        {"qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias})
    m = x2.shape[0]
    if m == 0:
        return out.reshape(*lead, n)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if isinstance(config, str):
        config = choice_from_name(config) if config else None
    if config is None:
        config = heuristic_choice(m, n, k, act, mixed_gemm.sm_count(dev), bits, mode, group_size)
    if isinstance(config, decode.DecodeChoice):
        _check(_decode_fits(m, n, k, mode, group_size) and decode.fits(
            m, n, k, group_size, decode.MODE_GROUPZERO, config),
            f"decode kernel {config.name} does not take layout {layout} M={m} N={n} K={k} "
            f"g={group_size}")
        qweight, scales, zeros, bias = mixed_gemm.stage_weights(
            "mixed_gemm_sm80_cuda", n, x.dtype, qweight, scales, zeros, bias)
        with torch.cuda.device(dev):
            decode.run(_DECODE_GROUPZERO[act][bits], config, x2, qweight, scales, zeros, bias,
                       out, group_size)
        return out.reshape(*lead, n)
    choice = config if isinstance(config, Choice) else Choice(config)
    cfg = choice.config
    _check(cfg.act == act, f"config {config_name(cfg)} is for {cfg.act}, x is {act}")
    _check((cfg.mode, cfg.bits) == (mode, bits),
           f"config {config_name(cfg)} does not run layout {layout} with bits={bits}")
    qweight, scales, zeros, bias = mixed_gemm.stage_weights("mixed_gemm_sm80_cuda", n, x.dtype,
                                                            qweight, scales, zeros, bias)
    if dev != torch.cuda.current_device():
        # the library launches on (and sizes its workspace for) the current device
        with torch.cuda.device(dev):
            return mixed_gemm_sm80_cuda(x, qweight, scales, zeros, bias, bits, True, group_size,
                                        "none", layout, choice, out).reshape(*lead, n)
    lib = _lib(cfg)
    ws_bytes = _workspace_bytes(cfg, m, n, k, choice.decomposition, choice.splits, dev)
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    bias_ptr = bias.data_ptr() if bias is not None else None
    if mode == "rs":
        rc = lib.qc_mixed_gemm_sm80(
            x2.data_ptr(), qweight.data_ptr(), scales.reshape(n).data_ptr(), bias_ptr,
            out.data_ptr(), m, n, k, choice.decomposition, choice.splits, ws.data_ptr(), ws_bytes,
            stream)
    else:
        splits = choice.splits if choice.decomposition == DECOMP_SPLIT_K else 1
        rc = lib.qc_mixed_gemm_gz_sm80(
            x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bias_ptr,
            out.data_ptr(), m, n, k, group_size, splits, ws.data_ptr(), ws_bytes, stream)
    if rc != 0:
        raise RuntimeError(f"sm80 mixed GEMM {choice_name(choice)} (M={m} N={n} K={k} "
                           f"g={group_size}) failed with CUDA error {rc}")
    return out.reshape(*lead, n)


# the Hopper family's name for the same call (qcompile.kernels' autotuner calls
# ``fam.mixed_gemm_cuda`` of every family)
mixed_gemm_cuda = mixed_gemm_sm80_cuda
