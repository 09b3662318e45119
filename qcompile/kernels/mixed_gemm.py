"""Hopper CUTLASS mixed-input GEMM (bf16/fp16 activations x int4/int8 weights) for
``qcompile::mixed_gemm``.

What is here: the kernel configurations (data), the heuristic that picks one for a
problem, the offline weight preparation (reorder + scale/zero conversion) for this
family's two layouts, the call into ``csrc/mixed_gemm_sm90.cu`` through ctypes, the named
choices the autotuner times (:func:`candidates`). ``qcompile.kernels.run_family`` runs the
op for this family's layouts; everything the kernel cannot take falls back to plain
PyTorch (``ops.mixed_gemm_reference`` for the "nk" layout, a dequantize of our own layout
otherwise), so a prepared weight always runs.

Layouts (the op's ``layout`` argument):

- ``sm90_mixed_v1_rowscale``: per-channel signed weights without zeros. ``qweight`` is the
  reordered q; ``scales`` float32 [N], applied in the epilogue (it factors out of the K
  sum, so the main loop only converts); ``zeros`` None.
- ``sm90_mixed_v1_groupzero``: everything else (group-wise, zeros, unsigned). ``qweight``
  is the reordered signed q' (unsigned values shifted by 2**(bits-1)); ``scales`` and
  ``zeros`` are [K/g, N] in the activation dtype and the weight is ``q' * s + z'`` (the
  form CUTLASS's ConvertAndScaleWithZero computes), z' folding the shift and the zero
  mode in: "none" z' = off*s, "sub" z' = (off - z)*s, "add" z' = off*s + z.

``qweight`` keeps N as its leading dimension ([N, K/2] uint8 for int4, [N, K] int8), as
the op's fake implementation assumes; its contents are in the order the kernel reads.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import threading
from dataclasses import dataclass

import torch

from . import mixed_gemm_decode as decode
from . import ops

log = logging.getLogger("qcompile.kernels")

__all__ = [
    "CONFIGS",
    "EXPERIMENTAL_CONFIGS",
    "LAYOUT_ROWSCALE",
    "LAYOUT_GROUPZERO",
    "MixedGemmConfig",
    "Choice",
    "build_all",
    "choose_config",
    "heuristic_choice",
    "config_name",
    "kernel_order",
    "describe",
    "mixed_gemm_cuda",
    "prepare_weight",
    "reference_prepared",
    "candidates",
    "choice_name",
    "choice_from_name",
    "reorder_weight",
    "select_layout",
    "supports",
    "unreorder_weight",
]

SOURCE = "mixed_gemm_sm90.cu"
LAYOUT_ROWSCALE = "sm90_mixed_v1_rowscale"
LAYOUT_GROUPZERO = "sm90_mixed_v1_groupzero"
LAYOUTS = (LAYOUT_ROWSCALE, LAYOUT_GROUPZERO)
_MODE_OF_LAYOUT = {LAYOUT_ROWSCALE: 0, LAYOUT_GROUPZERO: 2}

# Problem limits. N: the weight reorder works on 16-row blocks. K: a multiple of the 64-wide
# main-loop K tile; group sizes must be multiples of a config's K tile (CUTLASS's
# mixed-input collective). Group 32 is not taken: a 32-wide K tile fails the collective's
# static_assert(K_BLOCK_MAX >= 4) (CUTLASS 4.2; four 16-deep MMAs per K tile at least).
N_ALIGN = 16
K_ALIGN = 64
TILE_K = 64

_ACT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_ACT_DTYPES = {v: k for k, v in _ACT_NAMES.items()}

# decomposition argument of the kernel (stream-K builds only)
DECOMP_HEURISTIC, DECOMP_DATA_PARALLEL, DECOMP_SPLIT_K, DECOMP_STREAM_K = 0, 1, 2, 3


@dataclass(frozen=True)
class MixedGemmConfig:
    """One compiled kernel: types, tile, cluster, schedule (all -D defines of the source)."""

    act: str              # "bf16" | "fp16"
    bits: int             # 4 | 8
    mode: int             # 0: row scale in the epilogue, 2: group scale + zero in the main loop,
                          # 1: table lookup + block scale in the main loop (LUT_SOURCE, LUT_CONFIGS)
    tile_m: int = 128     # weight rows (output channels) per CTA
    tile_n: int = 64      # tokens per CTA
    tile_k: int = TILE_K
    cluster_m: int = 1
    cluster_n: int = 1
    coop: bool = True     # cooperative (128-row tiles) vs pingpong (64-row tiles)
    streamk: bool = True  # StreamKScheduler: split-K / stream-K chosen per call

    def defines(self) -> dict[str, int]:
        return {
            "QC_ACT_FP16": int(self.act == "fp16"),
            "QC_WBITS": self.bits,
            "QC_MODE": self.mode,
            "QC_TILE_M": self.tile_m,
            "QC_TILE_N": self.tile_n,
            "QC_TILE_K": self.tile_k,
            "QC_CLUSTER_M": self.cluster_m,
            "QC_CLUSTER_N": self.cluster_n,
            "QC_COOP": int(self.coop),
            "QC_STREAMK": int(self.streamk),
        }

    def info(self) -> list[int]:
        """What qc_mixed_gemm_sm90_info of this build must report (last: sm90 compiled in)."""
        d = self.defines()
        return [d[k] for k in ("QC_ACT_FP16", "QC_WBITS", "QC_MODE", "QC_TILE_M", "QC_TILE_N",
                               "QC_TILE_K", "QC_CLUSTER_M", "QC_CLUSTER_N", "QC_COOP",
                               "QC_STREAMK")] + [1]


def config_name(cfg: MixedGemmConfig) -> str:
    """Short readable name for reports, e.g. ``bf16.w4.gz.128x16x64.coop.sk``."""
    mode = {0: "rs", 1: "lut", 2: "gz"}[cfg.mode]
    sched = "coop" if cfg.coop else "pp"
    name = f"{cfg.act}.w{cfg.bits}.{mode}.{cfg.tile_m}x{cfg.tile_n}x{cfg.tile_k}.{sched}"
    if (cfg.cluster_m, cfg.cluster_n) != (1, 1):
        name += f".c{cfg.cluster_m}x{cfg.cluster_n}"
    return name + (".sk" if cfg.streamk else "")


def _fits(c: MixedGemmConfig, act: str, bits: int, mode: int, group: int | None = None,
          k: int | None = None) -> bool:
    """Whether config c runs this format (its K tile must divide a group smaller than K)."""
    return ((c.act, c.bits, c.mode) == (act, bits, mode)
            and (group is None or group == k or mode == 0 or group % c.tile_k == 0))


def _family(act: str, bits: int, mode: int, group: int | None = None,
            k: int | None = None) -> tuple[MixedGemmConfig, ...]:
    """The built configs (CONFIGS, or LUT_CONFIGS for mode 1) that run a format."""
    return tuple(c for c in (LUT_CONFIGS if mode == MODE_LUT else CONFIGS)
                 if _fits(c, act, bits, mode, group, k))


@functools.cache  # of immutable configs; the heuristic runs it on every call without a config
def _deepest(configs: tuple[MixedGemmConfig, ...]) -> tuple[MixedGemmConfig, ...]:
    """configs less those with a deeper-K twin (the same but tile_k) among them: the deeper
    K tile makes fewer main-loop round trips and was as fast or faster where both were timed."""
    key = {c: dataclasses.replace(c, tile_k=TILE_K) for c in configs}
    best = {key[c]: c for c in sorted(configs, key=lambda c: c.tile_k)}
    return tuple(c for c in configs if best[key[c]] is c)


@functools.cache
def _twin(c: MixedGemmConfig, family: tuple[MixedGemmConfig, ...],
          **changes) -> MixedGemmConfig | None:
    """The build of ``family`` that is ``c`` with ``changes`` (another schedule or cluster of
    the same tile), or None where it is not built."""
    twin = dataclasses.replace(c, **changes)
    return twin if twin in family else None


ACTS = ("bf16", "fp16")  # activation types every tile is built for

# Every (activation, bits, mode) has the general 128x64 stream-K kernel (it runs any M);
# the two common formats (int4 group-wise, int8 per-channel, bf16) add decode tiles
# (16 tokens; 32 for 17-32 tokens, which wastes fewer MMA columns than the 64-token tile and
# was faster where both were timed), data-parallel 128x128 /
# 128x192 / 128x256 tiles for prefill (a wider token tile reuses each converted weight
# fragment for more MMAs), stream-K builds of 128x128 for prefill with too few output tiles
# to fill the SMs (it splits K) and of 128x256 for part-empty waves, and 64-row pingpong tiles
# (32 / 64 / 80 / 96 / 128 tokens) for one wave of tiles over a short K loop (PINGPONG_MAX_K).
CONFIGS: tuple[MixedGemmConfig, ...] = tuple(
    MixedGemmConfig(act, bits, mode, 128, 64)
    for act in ACTS for bits in (4, 8) for mode in (0, 2)
) + tuple(
    MixedGemmConfig(act, bits, mode, 128, tile_n, streamk=(tile_n <= 32))
    for act in ACTS for bits, mode in ((4, 2), (8, 0)) for tile_n in (16, 32, 128, 256)
) + tuple(
    # 128-deep K tiles for the stream-K tiles of up to 64 tokens: half the main loop's
    # barrier round trips, and as fast or faster than the 64-deep build of the same tile and
    # split wherever both were timed (docs/design.md). Groups must be multiples of 128 (the
    # 64-deep builds keep group 64).
    MixedGemmConfig(act, bits, mode, 128, tile_n, 128, streamk=True)
    for act in ACTS for bits, mode in ((4, 2), (8, 0)) for tile_n in (16, 32, 64)
) + tuple(
    cfg
    for act in ACTS for bits, mode in ((4, 2), (8, 0))
    for cfg in (MixedGemmConfig(act, bits, mode, 128, 128, streamk=True),
                MixedGemmConfig(act, bits, mode, 64, 128, coop=False, streamk=False),
                # the 128x256 tile on a 2x1 cluster (each token tile multicast to the two
                # CTAs of a cluster): for wide layers (CLUSTER_MIN_N)
                MixedGemmConfig(act, bits, mode, 128, 256, cluster_m=2, streamk=False),
                # and under the stream-K scheduler: where its tiles leave the last wave of
                # CTAs mostly empty (STREAM_K_COST)
                MixedGemmConfig(act, bits, mode, 128, 256, streamk=True),
                # a 192-token tile: a full wave where 128 and 256 leave one part-empty
                # (TILE_FIXED_TOKENS)
                MixedGemmConfig(act, bits, mode, 128, 192, streamk=False))
) + tuple(
    # the pingpong tile 128-deep in K for group-wise int4 (groups of 128 and more): half the
    # round trips, faster than the 64-deep build in every cell timed. (For int8 per-channel
    # it was not faster everywhere, so that build stays experimental; docs/design.md.)
    MixedGemmConfig(act, 4, 2, 64, 128, 128, coop=False, streamk=False) for act in ACTS
) + tuple(
    # and 32 / 64-token pingpong tiles, 128-deep, for one wave of them at 17-64 tokens: as
    # many CTAs as split-K on the 128-row tiles without its fix-up, and faster than it at
    # K = 4096, but not at K = 14336 (PINGPONG_MAX_K; docs/design.md)
    MixedGemmConfig(act, bits, mode, 64, tile_n, 128, coop=False, streamk=False)
    for act in ACTS for bits, mode in ((4, 2), (8, 0)) for tile_n in (32, 64)
) + tuple(
    # and 80 / 96-token ones, so that two token tiles pad at most PINGPONG_MAX_PAD tokens
    # from 129 to 192 tokens, where 128-token tiles padded 64-127 and lost to split-K; with
    # them the pingpong tiles beat split-K there (docs/design.md)
    MixedGemmConfig(act, bits, mode, 64, tile_n, 128, coop=False, streamk=False)
    for act in ACTS for bits, mode in ((4, 2), (8, 0)) for tile_n in (80, 96)
)

# The lookup-table GEMM (csrc/lut_gemm_sm90.cu, built per table by kernels/lut_gemm.py): the
# int4 family's tiles, 64 deep in K for NF4's blocks of 64: the 128x16 / 32 / 64 stream-K
# tiles (the last runs any M), the data-parallel prefill
# tiles with the 2x1-cluster and stream-K twins the heuristic takes for wide layers and
# part-empty waves, 128x128 under stream-K (few output tiles: split K), the 64x128 pingpong
# tile (one wave at K <= PINGPONG_MAX_K). choose_config picks among them as for int4.
MODE_LUT = 1
LUT_SOURCE = "lut_gemm_sm90.cu"
LUT_CONFIGS: tuple[MixedGemmConfig, ...] = tuple(
    cfg
    for act in ACTS
    for cfg in (*(MixedGemmConfig(act, 4, MODE_LUT, 128, tile_n, streamk=True)
                  for tile_n in (16, 32, 64)),
                MixedGemmConfig(act, 4, MODE_LUT, 128, 128, streamk=True),
                MixedGemmConfig(act, 4, MODE_LUT, 128, 128, streamk=False),
                MixedGemmConfig(act, 4, MODE_LUT, 128, 192, streamk=False),
                MixedGemmConfig(act, 4, MODE_LUT, 128, 256, streamk=False),
                MixedGemmConfig(act, 4, MODE_LUT, 128, 256, cluster_m=2, streamk=False),
                MixedGemmConfig(act, 4, MODE_LUT, 128, 256, streamk=True),
                MixedGemmConfig(act, 4, MODE_LUT, 64, 128, coop=False, streamk=False))
)

# Output channels from which the heuristic runs a data-parallel tile on its 2x1-cluster build
# where there is one: multicasting each token tile to the cluster's two CTAs made 14336-row
# layers faster at long prefill, while 4096-row layers gained nothing (docs/design.md).
CLUSTER_MIN_N = 8192

# The prefill tiles' cost model (choose_config): a data-parallel output tile of t tokens takes
# time in proportion to TILE_FIXED_TOKENS + t (converting its 128 weight rows costs about as
# much as that many tokens of MMAs, fitted to the 128- and 256-token tiles' times at one
# long prefill), and the kernel as many tile times as it has waves of tiles, the last one
# counted whole. That picks the 192-token tile where 128 and 256 leave a wave part-empty,
# which beat the earlier pick and matched or beat cuBLAS in every such cell timed, and keeps
# every pick measured before (docs/design.md).
TILE_FIXED_TOKENS = 55
# The 256-token tile under the stream-K scheduler spreads a fractional last wave over every SM
# at this cost factor (CUTLASS's fix-ups of partial sums), so it is taken where the last wave
# is under about 0.87 full: there it beat the data-parallel tile, and with full waves it lost
# (docs/design.md).
STREAM_K_COST = 1.15
# Stream-K where all the tiles fit one wave only for K from this: a short K loop does not
# carry the fix-ups (with one wave, data-parallel won at K = 4096 and stream-K at K = 14336;
# with more than one wave stream-K won at K = 4096 too; docs/design.md).
STREAM_K_ONE_WAVE_MIN_K = 8192
# The 64-row pingpong tiles, data-parallel, where too few 128-row tiles would have K split:
# they give the SMs as many CTAs as a split K without the partial sums' fix-up, which a short
# K loop does not carry. The smallest holding the tokens (32 / 64 / 80 / 96 / 128; beyond
# 128, the widest of several token tiles that qualifies, PINGPONG_SEVERAL_MIN_N) is taken
# from PINGPONG_MIN_M tokens for K up to PINGPONG_MAX_K where its tiles make one wave that
# fills at least half the SMs and the last token tile pads at most PINGPONG_MAX_PAD tokens:
# with more padding it ran slower than split-K (the padding rows of its activation tile, out
# of bounds, seem to cost; measured, not explained), and at K = 8192 and 14336 it lost to
# split-K. Its deepest build (128-deep for group-wise int4, CONFIGS) is faster still. The
# cells are in docs/design.md.
PINGPONG_MAX_K = 4096
PINGPONG_MAX_PAD = 32
PINGPONG_MIN_M = 17  # measured from 17 tokens (below, the decode kernel or 16-token tiles)
# Several token tiles a row tile only on pingpong tiles this wide (80 / 96 / 128 tokens, each
# measured so; narrower ones would convert every weight row many times over, not measured)
PINGPONG_SEVERAL_MIN_N = 80
# ... and, for group-wise int4, the narrowest (32 tokens) in two token tiles up to this many
# tokens where the tile holding them makes too few tiles for half the SMs and the two token
# tiles a nearly full wave (PINGPONG_HALVES_MIN_FILL of the SMs): at 4096x4096 and 64 tokens
# (int4 g128, H100, clean flush) 64x32 in two token tiles (128 CTAs) took 18.3 us (fp16 17.8)
# against 18.9 (18.4) for 64x64 (64 CTAs) and 20.1 (20.0) for split-K on 128x64 tiles, the
# pick before. 33-63 tokens run the same padded tiles as 64 in both. Not measured: int8, and
# part-full waves (3072 rows: 96 CTAs), which keep split-K.
PINGPONG_HALVES_MAX_M = 64
PINGPONG_HALVES_MIN_FILL = 0.875

# Built for measurement only (the benchmark's --explore --experimental), so neither the
# heuristic nor autotuning uses them: none beat the configs above at the token counts
# (the three issue shapes), and the few cells they won in between (64x256 pingpong at
# M = 512 / 1024) are single runs. 128-deep K on the data-parallel prefill tiles won one int4
# cell and lost int8 (on 128x256 its stages do not fit and it ran far slower); on the 128x128
# stream-K tile under split-K it timed as the 64-deep build either way; on the int8 64x128
# pingpong tile, CONFIGS' comment on its int4 twin (docs/design.md, tried and lost).
EXPERIMENTAL_CONFIGS: tuple[MixedGemmConfig, ...] = tuple(
    cfg
    for bits, mode in ((4, 2), (8, 0))
    for cfg in (
        MixedGemmConfig("bf16", bits, mode, 64, 256, coop=False, streamk=False),
        *(MixedGemmConfig("bf16", bits, mode, 128, tile_n, 128, streamk=False)
          for tile_n in (128, 256)),
        MixedGemmConfig("bf16", bits, mode, 128, 128, 128, streamk=True),
    )
) + (MixedGemmConfig("bf16", 8, 0, 64, 128, 128, coop=False, streamk=False),)


@dataclass(frozen=True)
class Choice:
    """A config plus how its stream-K scheduler splits the work for one call."""

    config: MixedGemmConfig
    decomposition: int = DECOMP_DATA_PARALLEL
    splits: int = 1


# 64-deep K tiles a split must keep for group-wise weights to take one token tile over two
# (between the 16 where two won and the 56 where one won; choose_config's docstring says why,
# docs/design.md has the cells)
DEEP_SPLIT_K_TILES = 48


def choose_config(m: int, n: int, k: int, act: str, bits: int, mode: int,
                  sm_count: int = 132, group_size: int | None = None) -> Choice:
    """Pick the kernel for out[m, n] = x[m, k] @ W[n, k].T.

    A split fixed per call (split-K) rather than CUTLASS's stream-K decomposition at decode,
    and the 128x256 tile over 128x128 for long prefill: each was the faster where both were
    timed (docs/design.md, heuristic).

    Token tile: for m <= 64 the smallest built tile (16 / 64) that holds m (fewer wasted
    MMA columns at decode); beyond, of the data-parallel tiles (128 / 192 / 256) that give at
    least half the SMs a tile, the one whose waves of tiles take least time by a cost model
    (TILE_FIXED_TOKENS; the 256-token tile also under stream-K, STREAM_K_COST), else a
    stream-K build of at most two token tiles a row tile split over K (faster than a
    data-parallel 128x64 tile that leaves SMs idle). Small problems leave SMs
    idle (4096 output channels are 32 tiles of 128 rows on 132 SMs), so a stream-K build
    splits K over about sm_count / tiles CTAs (split-K), keeping at least 512 of K per
    split. Of two builds of one tile, the deeper K tile where the group size allows it.
    With K up to PINGPONG_MAX_K, a 64-row pingpong tile whose tiles make one wave of at least
    half the SMs (and whose last token tile pads few tokens) comes first; for group-wise int4
    at 33-64 tokens also the 32-token one in two token tiles, where they make a nearly full
    wave (PINGPONG_HALVES_MIN_FILL).

    Where K is split, the tokens may sit in one token tile (more splits) or two (fewer):
    two token tiles convert each weight twice, more splits chain more partial sums through
    the workspace. Per-channel weights (mode 0: nothing but a convert in the main loop) take
    two whenever that still splits K; group-wise ones (mode 2: scale and zero in the main
    loop, so a second conversion costs more) take one where each split still gets
    DEEP_SPLIT_K_TILES K tiles (docs/design.md has the cells for both).
    """
    family = _family(act, bits, mode, group_size, k)
    if not family:
        raise ValueError(f"no mixed-GEMM config for act={act} bits={bits} mode={mode} "
                         f"group={group_size}")

    def tiles(c: MixedGemmConfig) -> int:
        return math.ceil(n / c.tile_m) * math.ceil(m / c.tile_n)

    def split_k(c: MixedGemmConfig) -> Choice:
        splits = min(sm_count // max(tiles(c), 1), k // (8 * TILE_K), 16)
        if splits >= 2:
            return Choice(c, DECOMP_SPLIT_K, splits)
        return Choice(c, DECOMP_DATA_PARALLEL, 1)

    # the stream-K builds of up to 64 tokens (decode and the general fallback), the
    # data-parallel prefill tiles, the stream-K prefill tile, the pingpong tile for one wave
    # (PINGPONG_MAX_K)
    deep = _deepest(family)
    deepest = [c for c in deep if c.streamk]
    small = sorted((c for c in deepest if c.tile_n <= 64), key=lambda c: c.tile_n)
    wide = sorted((c for c in family if c.coop and not c.streamk and c.cluster_m == 1),
                  key=lambda c: -c.tile_n)
    # (not the 256-token stream-K build: it serves the rule for part-empty waves below, and
    # splitting K on it was slower than 128x128 split-K where timed)
    wide_split = [c for c in deepest if 64 < c.tile_n < 256]
    streamk = sorted(small + wide_split, key=lambda c: c.tile_n)

    def holding(tokens: int, builds: list[MixedGemmConfig]) -> MixedGemmConfig:
        return next((c for c in builds if c.tile_n >= tokens), builds[-1])

    pingpongs = sorted((c for c in deep if not c.coop), key=lambda c: c.tile_n)
    if pingpongs and k <= PINGPONG_MAX_K and m >= PINGPONG_MIN_M:
        # the smallest tile holding the tokens; beyond the widest, the widest whose token
        # tiles' waves and padding qualify, of PINGPONG_SEVERAL_MIN_N tokens or more
        holds = [c for c in pingpongs if c.tile_n >= m]
        several = [c for c in pingpongs[::-1] if c.tile_n >= PINGPONG_SEVERAL_MIN_N]
        # int4 up to PINGPONG_HALVES_MAX_M tokens: the narrowest tile in two token tiles where
        # they make a nearly full wave (4096 rows at 33-64 tokens), after the one holding them
        halves = [c for c in pingpongs[:1] if bits == 4 and m <= PINGPONG_HALVES_MAX_M
                  and 2 * c.tile_n >= m and tiles(c) >= PINGPONG_HALVES_MIN_FILL * sm_count]
        for pingpong in (holds[:1] + halves) or several:
            if (-m) % pingpong.tile_n <= PINGPONG_MAX_PAD and sm_count // 2 <= tiles(pingpong) <= sm_count:
                return Choice(pingpong)
    # the same tokens split over K in one token tile or in two (docstring)
    two = split_k(holding(-(-m // 2), streamk))
    if mode == 0 and two.decomposition == DECOMP_SPLIT_K:
        return two
    if m <= 64 or not (wide or wide_split):
        return split_k(holding(m, small))
    # prefill: of the data-parallel tiles that give at least half the SMs a tile (and the
    # 256-token tile under stream-K), the least estimated time: whole waves of tiles, a tile
    # costing its MMAs plus the conversion of its weights (TILE_FIXED_TOKENS); stream-K pays
    # STREAM_K_COST for a fractional wave (and not with one wave of short K loops)
    def tile_cost(c: MixedGemmConfig) -> float:
        return TILE_FIXED_TOKENS + c.tile_n

    options: list[tuple[float, int, Choice]] = []
    for c in wide:
        if tiles(c) < sm_count // 2:
            continue
        waves = tiles(c) / sm_count
        clustered = _twin(c, family, cluster_m=2) if n >= CLUSTER_MIN_N else None
        options.append((math.ceil(waves) * tile_cost(c), -c.tile_n, Choice(clustered or c)))
        streamed = _twin(c, family, streamk=True) if c.tile_n >= 256 else None
        if streamed and (waves > 1 or k >= STREAM_K_ONE_WAVE_MIN_K):
            options.append((waves * tile_cost(c) * STREAM_K_COST, -c.tile_n,
                            Choice(streamed, DECOMP_STREAM_K, 1)))
    if options:
        return min(options, key=lambda o: o[:2])[2]
    # too few output tiles: split K over a stream-K build of at most two token tiles a row
    # tile (faster than the data-parallel 128x64 tile and cuBLAS where timed), one where
    # group-wise weights are deep enough (docstring)
    one = split_k(holding(m, streamk))
    if one.decomposition == DECOMP_SPLIT_K and k // TILE_K // one.splits >= DEEP_SPLIT_K_TILES:
        return one
    return two


# Token counts up to which the heuristic runs the decode kernel (mixed_gemm_decode) instead
# of a CUTLASS config, where the format allows it: measured end to end on Llama-3-8B shapes
# against CUTLASS at every M (bench_decode --decode-max-m 8,0; docs/performance.md).
# (The rewrite's decode-kernel fusions -- gated MLP, RMSNorm, skip -- use this bound.)
DECODE_MAX_M = 8
# Up to this many tokens the decode kernel also runs where CUTLASS has too few output tiles
# for the SMs (at most one 32-row CTA per SM, N <= 32 x SMs) and for int8 weights: at 16
# tokens it beat CUTLASS there but not on wide int4 layers, and at 32 tokens CUTLASS won
# almost everywhere (docs/design.md).
DECODE_WIDE_MAX_M = 16


def decode_max_m(n: int, bits: int, sm_count: int = 132) -> int:
    """The most tokens for which the heuristic picks the decode kernel for an [N, K] weight."""
    if bits == 8 or n <= 32 * sm_count:
        return max(DECODE_MAX_M, DECODE_WIDE_MAX_M)
    return DECODE_MAX_M


def _decode_build(act: str, bits: int, mode: int) -> decode.DecodeBuild:
    return decode.DecodeBuild(act, bits, decode.LAYOUT_SM90, _decode_mode(mode))


def heuristic_choice(m: int, n: int, k: int, act: str, bits: int, mode: int,
                     sm_count: int = 132, group_size: int | None = None
                     ) -> Choice | decode.DecodeChoice:
    """The kernel for m tokens without measurements: the decode kernel up to
    :func:`decode_max_m` tokens where it takes the format, else :func:`choose_config`."""
    if (m <= decode_max_m(n, bits, sm_count)
            and decode.fits(m, n, k, group_size or k, _decode_mode(mode))):
        return decode.heuristic(m, n, k, sm_count, _decode_group(mode, group_size, k))
    return choose_config(m, n, k, act, bits, mode, sm_count, group_size)


def _decode_mode(mode: int) -> int:
    return decode.MODE_ROWSCALE if mode == 0 else decode.MODE_GROUPZERO


def _decode_group(mode: int, group_size: int | None, k: int) -> int:
    """The group size the decode kernel's heuristic is told: 0 for per-channel scales."""
    return 0 if mode == 0 else (group_size or k)


_DECOMP_SUFFIX = {DECOMP_DATA_PARALLEL: "dp", DECOMP_STREAM_K: "streamk"}


def choice_name(choice: Choice | decode.DecodeChoice) -> str:
    """The stable name of a choice (config plus work split), e.g.
    ``bf16.w4.gz.128x16x64.coop.sk/sk4`` (split-K into 4) or ``.../dp``; decode-kernel
    choices are named by that module (``decode.t8.r16.w8``)."""
    if isinstance(choice, decode.DecodeChoice):
        return choice.name
    name = config_name(choice.config)
    if not choice.config.streamk:
        return name
    if choice.decomposition == DECOMP_SPLIT_K:
        return f"{name}/sk{choice.splits}"
    return f"{name}/{_DECOMP_SUFFIX.get(choice.decomposition, 'dp')}"


@functools.cache
def _configs_by_name() -> dict[str, MixedGemmConfig]:
    return {config_name(c): c for c in CONFIGS + EXPERIMENTAL_CONFIGS}


def choice_from_name(name: str) -> Choice | decode.DecodeChoice:
    """Inverse of :func:`choice_name`; ValueError for a name this family does not have."""
    if decode.is_name(name):
        return decode.choice_from_name(name)
    base, _, split = name.partition("/")
    cfg = _configs_by_name().get(base)
    if cfg is None or (split and not cfg.streamk):
        raise ValueError(f"no sm90 mixed-GEMM choice named {name!r}")
    if not split or split == "dp":
        return Choice(cfg)
    if split == "streamk":
        return Choice(cfg, DECOMP_STREAM_K)
    if split.startswith("sk") and split[2:].isdigit() and int(split[2:]) >= 2:
        return Choice(cfg, DECOMP_SPLIT_K, int(split[2:]))
    raise ValueError(f"no sm90 mixed-GEMM choice named {name!r}")


def candidates(m: int, n: int, k: int, act: str, bits: int, group_size: int, layout: str,
               sm_count: int = 132) -> list[str]:
    """Choices worth timing for one problem: the heuristic's first, the decode kernel's
    launch shapes (m <= its limit), then every built tile that is not wider than needed
    (pingpong tiles only where they make one wave), each data-parallel and (stream-K
    builds, few output tiles) split-K 2 / 4 / 8 ways."""
    mode = _MODE_OF_LAYOUT[layout]
    group_size = None if mode == 0 else group_size
    first = choice_name(heuristic_choice(m, n, k, act, bits, mode, sm_count, group_size))
    names = [first]
    if decode.fits(m, n, k, group_size or k, _decode_mode(mode)):
        names += decode.candidates(m, n, k, sm_count, _decode_group(mode, group_size, k))
    family = sorted(_deepest(_family(act, bits, mode, group_size, k)), key=lambda c: c.tile_n)
    smallest_fit = next((c.tile_n for c in family if c.tile_n >= m), family[-1].tile_n)
    for cfg in family:
        if cfg.tile_n > max(smallest_fit, 64) and m <= 64:
            continue  # wider token tiles only waste MMA columns at decode
        tiles = math.ceil(n / cfg.tile_m) * math.ceil(m / cfg.tile_n)
        if not cfg.coop and tiles > sm_count:
            continue  # beyond one wave pingpong tiles lost wherever timed (docs/design.md)
        names.append(choice_name(Choice(cfg)))
        if cfg.streamk and tiles < sm_count:
            for s in (2, 4, 8):
                if k // cfg.tile_k >= 4 * s:
                    names.append(choice_name(Choice(cfg, DECOMP_SPLIT_K, s)))
    return list(dict.fromkeys(names))


# --- weight preparation (torch; runs on CPU or GPU) -------------------------------------
#
# The kernel reads W through a CuTe layout (csrc/mixed_gemm_sm90.cuh) that, per 16 x 16
# block of (rows n, columns k), puts the 8 values one thread feeds to wgmma side by side.
# Writing n = 16*nb + 8*m1 + m0 and k = 16*kb + 8*k2 + 2*k1 + k0, the element offset is
#   256 * (nb + (N/16) * kb) + 32*m0 + 8*k1 + m1 + {int4: 4*k0 + 2*k2, int8: 2*k0 + 4*k2}
# (the in-thread value order differs: it is what each converter unpacks fastest). That is
# a pure permutation of the axes of q viewed as [N/16, 2, 8, K/16, 2, 4, 2].
_AXES = ("nb", "m1", "m0", "kb", "k2", "k1", "k0")
# destination order, slowest to fastest (stride 256*..., 32, 8, then the value order)
_DEST = {
    4: ("kb", "nb", "m0", "k1", "k0", "k2", "m1"),
    8: ("kb", "nb", "m0", "k1", "k2", "k0", "m1"),
}


def _perm(bits: int) -> list[int]:
    return [_AXES.index(a) for a in _DEST[bits]]


def kernel_order(t: torch.Tensor, bits: int) -> torch.Tensor:
    """The elements of t [N, K] (any dtype) flattened in the kernel's memory order."""
    n, k = t.shape
    if n % N_ALIGN or k % 16:
        raise ValueError(f"reorder needs N % 16 == 0 and K % 16 == 0, got N={n}, K={k}")
    t = t.reshape(n // 16, 2, 8, k // 16, 2, 4, 2).permute(_perm(bits))
    return t.contiguous().reshape(-1)


def reorder_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer values q [N, K] (signed, int8 dtype) -> the kernel's qweight.

    int4: uint8 [N, K/2], element at offset o in byte o//2 (low nibble when o is even);
    int8: int8 [N, K].
    """
    flat = kernel_order(q.to(torch.int8), bits)
    n, k = q.shape
    if bits == 8:
        return flat.reshape(n, k)
    nib = flat.view(torch.uint8) & 0xF
    return (nib[0::2] | (nib[1::2] << 4)).reshape(n, k // 2)


def unreorder_weight(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`reorder_weight`: the signed values as int8 [N, K]."""
    n = qweight.shape[0]
    if bits == 8:
        flat = qweight.reshape(-1).view(torch.int8)
    else:
        b = qweight.reshape(-1).view(torch.uint8).to(torch.int16)
        nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(-1)
        flat = torch.where(nib > 7, nib - 16, nib).to(torch.int8)
    dest_shape = [dict(zip(_AXES, (n // 16, 2, 8, k // 16, 2, 4, 2)))[a] for a in _DEST[bits]]
    inv = [_DEST[bits].index(a) for a in _AXES]
    return flat.reshape(dest_shape).permute(inv).contiguous().reshape(n, k)


def select_layout(bits: int, signed: bool, group_size: int, zero_mode: str, n: int, k: int,
                  act_dtype: torch.dtype, device: torch.device | str) -> str | None:
    """This family's layout for a weight format, or None if it cannot run it.

    Builds (or finds cached) the kernels the layout needs, so a missing toolchain shows up
    here as KernelBuildError, before the weight is packed for a kernel that cannot run.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability(device) != (9, 0):
        return None  # sm_90a code runs on Hopper only
    if act_dtype not in _ACT_NAMES or bits not in (4, 8) or zero_mode not in ops.ZERO_MODES:
        return None
    if n % N_ALIGN or k % K_ALIGN or group_size <= 0 or k % group_size:
        return None
    if group_size == k and signed and zero_mode == "none":
        layout = LAYOUT_ROWSCALE
    else:
        layout = LAYOUT_GROUPZERO
    family = _family(_ACT_NAMES[act_dtype], bits, _MODE_OF_LAYOUT[layout], group_size, k)
    if not family:
        return None  # e.g. group 32 where no config has a 32-wide K tile
    from .build import KernelSpec, build_many
    build_many([KernelSpec(SOURCE, c.defines(), "sm_90a") for c in family]
               + [decode.kernel_spec(_decode_build(_ACT_NAMES[act_dtype], bits,
                                                   _MODE_OF_LAYOUT[layout]))])
    return layout


def describe(layout: str, m: int | None, n: int, k: int, act_dtype: torch.dtype,
             device: torch.device | str, bits: int = 4, group_size: int | None = None) -> str:
    """One line for the match report: the config(s) this problem dispatches to by M."""
    act = _ACT_NAMES.get(act_dtype, str(act_dtype))
    mode = _MODE_OF_LAYOUT[layout]
    group = None if layout == LAYOUT_ROWSCALE else group_size
    ms = (m,) if m is not None else (1, 16, 64, 256, 2048)
    sms = sm_count(torch.device(device).index or 0)
    names = dict.fromkeys(_short_name(heuristic_choice(mm, n, k, act, bits, mode, sms, group))
                          for mm in ms)
    where = "main-loop group scale+zero" if mode else "epilogue per-channel scale"
    if any(decode.is_name(name) for name in names):
        where += "; decode.*: qcompile's mma.sync decode kernel on this layout"
    return f"cutlass sm90 {', '.join(names)} ({where})" if m is not None else \
        f"cutlass sm90 by M: {', '.join(names)} ({where})"


def _short_name(choice: Choice | decode.DecodeChoice) -> str:
    return choice.name if isinstance(choice, decode.DecodeChoice) else config_name(choice.config)


def prepare_weight(q_nk: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, signed: bool, group_size: int, zero_mode: str, layout: str,
                   act_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q [N, K] integers, scales [N, K/g], zeros [N, K/g] | None) -> this layout's operands.

    Runs once at compile time, on whatever device q_nk is on.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"not a {__name__} layout: {layout!r}")
    n, k = q_nk.shape
    groups = k // group_size
    if not signed and bits == 8 and q_nk.dtype == torch.int8:
        q_nk = q_nk.view(torch.uint8)  # unsigned bytes handed over in an int8 tensor
    q = q_nk.to(torch.int16)
    off = 0 if signed else 1 << (bits - 1)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if int(q.min()) < lo or int(q.max()) > hi:
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"q values outside the {kind} {bits}-bit range [{lo}, {hi}]")
    qweight = reorder_weight((q - off).to(torch.int8), bits)
    s = scales.reshape(n, groups).to(torch.float32)
    if layout == LAYOUT_ROWSCALE:
        if zero_mode != "none" or not signed or groups != 1:
            raise ValueError("the rowscale layout takes signed per-channel weights without zeros")
        return qweight, s.reshape(n).contiguous(), None
    if zero_mode == "none":
        z = off * s
    else:
        if zeros is None:
            raise ValueError(f"zero_mode={zero_mode!r} needs zeros")
        z0 = zeros.reshape(n, groups).to(torch.float32)
        z = (off - z0) * s if zero_mode == "sub" else off * s + z0
    return (qweight, s.t().contiguous().to(act_dtype), z.t().contiguous().to(act_dtype))


def reference_prepared(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                       group_size: int, layout: str) -> torch.Tensor:
    """Plain-PyTorch mixed_gemm on this family's layouts (the fallback when the kernel can't)."""
    q = unreorder_weight(qweight, bits, x.shape[-1]).to(torch.float32)
    return linear_folded(x, q, scales, zeros, bias, group_size, layout == LAYOUT_ROWSCALE)


def linear_folded(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
                  rowscale: bool) -> torch.Tensor:
    """``x @ W.T + bias`` for q [N, K] (float) with prepared operands: W = q * s[n] (rowscale,
    scales [N]) or W = q * s + z' (scales and pre-multiplied zeros [K/g, N])."""
    if rowscale:
        w = q * scales.to(torch.float32).reshape(-1, 1)
    else:
        s = scales.to(torch.float32).t().repeat_interleave(group_size, dim=1)
        z = zeros.to(torch.float32).t().repeat_interleave(group_size, dim=1)
        w = q * s + z
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


# --- the kernel call ---------------------------------------------------------------------

_libs: dict[MixedGemmConfig, ctypes.CDLL] = {}
_lib_lock = threading.Lock()
_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64


def build_all(configs=CONFIGS) -> None:
    """Compile (in parallel) every config not yet in the cache."""
    from .build import KernelSpec, build_many
    build_many([KernelSpec(SOURCE, c.defines(), "sm_90a") for c in configs])


def _lib(cfg: MixedGemmConfig) -> ctypes.CDLL:
    lib = _libs.get(cfg)
    if lib is not None:
        return lib
    from .build import KernelSpec, load_checked
    with _lib_lock:
        lib = load_checked(KernelSpec(SOURCE, cfg.defines(), "sm_90a"), {
            "qc_mixed_gemm_sm90": (_I, [_P] * 7 + [_I] * 6 + [_P, _I64, _P]),
            "qc_mixed_gemm_sm90_workspace_size": (_I64, [_I] * 6),
            "qc_mixed_gemm_sm90_offsets": (_I, [_I, _I, _P]),
        }, info=("qc_mixed_gemm_sm90_info", cfg.info()))
        _libs[cfg] = lib
        return lib


@functools.lru_cache(maxsize=4096)
def _workspace_bytes(cfg: MixedGemmConfig, m: int, n: int, k: int, group: int, decomp: int,
                     splits: int, device: int) -> int:
    del device  # part of the key: the workspace depends on the device's SM count
    nbytes = _lib(cfg).qc_mixed_gemm_sm90_workspace_size(m, n, k, group, decomp, splits)
    if nbytes < 0:
        raise RuntimeError("qc_mixed_gemm_sm90_workspace_size failed (no CUDA device?)")
    return int(nbytes)


@functools.lru_cache(maxsize=16)
def sm_count(device: int) -> int:
    """Streaming multiprocessors of a CUDA device (the heuristics size split-K by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
             group_size: int, layout: str) -> bool:
    """Whether the kernel runs this call (else the impl falls back to PyTorch)."""
    if layout not in LAYOUTS or not x.is_cuda or x.dtype not in _ACT_NAMES or bits not in (4, 8):
        return False
    if layout == LAYOUT_GROUPZERO and scales.dtype != x.dtype:
        return False  # prepared for the other 16-bit activation type
    if torch.cuda.get_device_capability(x.device) != (9, 0):
        return False
    n, k = qweight.shape[0], x.shape[-1]
    if n % N_ALIGN or k % K_ALIGN or x.numel() == 0:
        return False
    return bool(_family(_ACT_NAMES[x.dtype], bits, _MODE_OF_LAYOUT[layout], group_size, k))


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t as a 16-byte aligned, densely packed tensor (what TMA, cp.async and the vector
    loads of both mixed-GEMM families need); no copy when it already is one."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def stage_activation(who: str, x: torch.Tensor, n: int, out: torch.Tensor | None,
                     operands: dict[str, torch.Tensor | None]):
    """The launch preparation both mixed-GEMM families share, before a kernel is chosen:
    every operand on x's device, x as an aligned [M, K], ``out`` allocated or checked
    ([M, N], contiguous, aligned, x.dtype). Returns (x's leading shape, x2, out); errors are
    ValueErrors prefixed with ``who``."""
    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"{who}: {msg}")
    for name, t in operands.items():
        check(t is None or t.device == x.device,
              f"{name} is on {t.device if t is not None else ''}, x on {x.device}")
    x2 = aligned(x.reshape(-1, x.shape[-1]))
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        check(out.dtype == x.dtype and tuple(out.shape) == (m, n) and out.is_contiguous()
              and out.device == x.device and out.data_ptr() % 16 == 0,
              f"out must be a contiguous, 16-byte aligned {x.dtype} [{m}, {n}] tensor "
              f"on {x.device}")
    return x.shape[:-1], x2, out


def stage_weights(who: str, n: int, dtype: torch.dtype, qweight: torch.Tensor,
                  scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None):
    """The weight operands aligned, and the bias as an aligned [N] in the activation dtype."""
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"{who}: bias must have N={n} elements, got {bias.numel()}")
        bias = aligned(bias.reshape(n).to(dtype))
    return (aligned(qweight), aligned(scales), aligned(zeros) if zeros is not None else None,
            bias)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"mixed_gemm_cuda: {msg}")


def mixed_gemm_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                    signed: bool, group_size: int, zero_mode: str, layout: str,
                    config: MixedGemmConfig | Choice | decode.DecodeChoice | str | None = None,
                    out: torch.Tensor | None = None, gated: bool = False,
                    norm: torch.Tensor | None = None, eps: float = 0.0,
                    residual: torch.Tensor | None = None, norm_ssq: torch.Tensor | None = None,
                    next_norm: torch.Tensor | None = None
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the CUTLASS kernel: x [..., K] (bf16/fp16) -> [..., N] in x.dtype.

    ``signed`` and ``zero_mode`` describe the original format; prepare_weight already folded
    them into the operands, so they are not needed here. ``out`` (optional, [M, N]
    contiguous, x.dtype) receives the result. ``gated``: the weight's 16-row tiles alternate
    a gated MLP's gate and up rows (``ops.interleave_gate_up``) and the result is [..., N/2]
    = silu(gate) * up, in the decode kernel's epilogue where it runs with 32-row CTAs, else
    after the GEMM (``ops.gate_up``). ``norm`` ([K]) and ``eps``: x is an RMSNorm's input
    (``ops.rms_norm``); ``residual`` (the output's shape, not with gated) is added to the
    result; both inside the decode kernel where it runs, else as PyTorch ops around the GEMM.
    ``norm_ssq`` ([..., K/16] float32, instead of ``norm``): x is already the norm's input
    times its weight and norm_ssq ``ops.norm_sums`` of that input. ``next_norm`` ([N], not with
    gated): returns (out, out * next_norm, ``ops.norm_sums(out)``), what the op after takes.
    No host syncs: safe to capture in a CUDA graph.
    """
    del signed, zero_mode
    _check(not gated or (out is None and qweight.shape[0] % 32 == 0),
           "gated: N must be a multiple of 32 and the result is returned, not written to out")
    fused = not (norm is None and residual is None and norm_ssq is None and next_norm is None)
    _check(not fused or out is None,
           "with norm, norm_ssq, residual or next_norm the result is returned, not written to out")
    _check((residual is None and next_norm is None) or not gated,
           "residual and next_norm do not go with gated")
    _check(norm is None or norm_ssq is None, "norm and norm_ssq exclude each other")
    _check(layout in LAYOUTS, f"layout {layout!r} is not one of {LAYOUTS}")
    _check(x.is_cuda, "x must be a CUDA tensor")
    _check(x.dtype in _ACT_NAMES, f"x must be bfloat16 or float16, got {x.dtype}")
    _check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    act = _ACT_NAMES[x.dtype]
    mode = _MODE_OF_LAYOUT[layout]
    k = x.shape[-1]
    n = qweight.shape[0]
    wdtype = torch.uint8 if bits == 4 else torch.int8
    _check(qweight.dtype == wdtype and tuple(qweight.shape) == (n, k * bits // 8),
           f"qweight must be {wdtype} [N, {k * bits // 8}] for K={k}, got "
           f"{qweight.dtype} {tuple(qweight.shape)}")
    _check(n % N_ALIGN == 0, f"N={n} must be a multiple of {N_ALIGN}")
    _check(k % K_ALIGN == 0, f"K={k} must be a multiple of {K_ALIGN}")
    if mode == 0:
        _check(scales.dtype == torch.float32 and scales.numel() == n,
               f"rowscale layout wants float32 scales [N={n}], "
               f"got {scales.dtype} {tuple(scales.shape)}")
        _check(zeros is None, "rowscale layout takes no zeros")
        group = k
    else:
        _check(group_size > 0 and k % group_size == 0 and
               bool(_family(act, bits, mode, group_size, k)),
               f"group_size={group_size} must divide K={k} and be a multiple of a built K tile "
               f"({sorted({c.tile_k for c in _family(act, bits, mode)})}) or equal K")
        g = k // group_size
        _check(scales.dtype == x.dtype and tuple(scales.shape) == (g, n),
               f"groupzero layout wants scales {x.dtype} [{g}, {n}], "
               f"got {scales.dtype} {tuple(scales.shape)}")
        _check(zeros is not None and zeros.dtype == x.dtype and tuple(zeros.shape) == (g, n),
               f"groupzero layout wants zeros {x.dtype} [{g}, {n}]")
        group = group_size
    lead, x2, out = stage_activation(
        "mixed_gemm_cuda", x, n, out,
        {"qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias})
    m = x2.shape[0]
    _check(norm is None or tuple(norm.shape) == (k,),
           f"norm must be [K={k}], got {None if norm is None else tuple(norm.shape)}")
    _check(residual is None or tuple(residual.shape) == (*lead, n),
           f"residual must have the output's shape {(*lead, n)}, got "
           f"{None if residual is None else tuple(residual.shape)}")
    _check(norm_ssq is None or (norm_ssq.dtype == torch.float32
                                and tuple(norm_ssq.shape) == (*lead, k // 16)),
           f"norm_ssq must be float32 {(*lead, k // 16)}, got "
           f"{None if norm_ssq is None else (norm_ssq.dtype, tuple(norm_ssq.shape))}")
    _check(next_norm is None or tuple(next_norm.shape) == (n,),
           f"next_norm must be [N={n}], got {None if next_norm is None else tuple(next_norm.shape)}")
    if m == 0:
        if next_norm is not None:
            return (out.reshape(*lead, n), out.reshape(*lead, n).clone(),
                    x.new_empty((*lead, n // 16), dtype=torch.float32))
        return out.reshape(*lead, n)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if isinstance(config, str):
        config = choice_from_name(config) if config else None
    if config is None:
        config = heuristic_choice(m, n, k, act, bits, mode, sm_count(dev), group)
    if gated and not (isinstance(config, decode.DecodeChoice) and config.rows == 32):
        return ops.gate_up(mixed_gemm_cuda(x, qweight, scales, zeros, bias, bits, True,
                                           group_size, "none", layout, config, norm=norm,
                                           eps=eps, norm_ssq=norm_ssq))
    if fused and not (isinstance(config, decode.DecodeChoice) and config.takes(
            m, k, x.element_size(), staged=norm is not None, given=norm_ssq is not None,
            norm_out=next_norm is not None, group=_decode_group(mode, group, k))):
        # the GEMM kernels take none of them (nor a decode launch without the shared memory
        # they need): PyTorch ops around the GEMM
        return ops.around_gemm(
            lambda xin: mixed_gemm_cuda(xin, qweight, scales, zeros, bias, bits, True,
                                        group_size, "none", layout, config, gated=gated),
            x, norm, eps, residual, norm_ssq, next_norm)
    if isinstance(config, decode.DecodeChoice):
        _check(decode.fits(m, n, k, group, _decode_mode(mode), config),
               f"decode kernel {config.name} does not take M={m} N={n} K={k} g={group}")
        qweight, scales, zeros, bias = stage_weights("mixed_gemm_cuda", n, x.dtype, qweight,
                                                     scales, zeros, bias)
        if gated:
            out = x2.new_empty((m, n // 2))
        norm, residual, norm_ssq, next_norm, normed, ssq_out = decode.stage_fusions(
            x2, out, norm, residual, norm_ssq, next_norm)
        with torch.cuda.device(dev):
            decode.run(_decode_build(act, bits, mode), config, x2, qweight, scales, zeros, bias,
                       out, group, gated, norm, eps, residual, norm_ssq, next_norm, normed,
                       ssq_out)
        if next_norm is not None:
            return (out.reshape(*lead, n), normed.reshape(*lead, n),
                    ssq_out.reshape(*lead, n // 16))
        return out.reshape(*lead, out.shape[1])
    choice = config if isinstance(config, Choice) else Choice(config)
    cfg = choice.config
    _check(_fits(cfg, act, bits, mode, group, k),
           f"config {config_name(cfg)} does not fit act={act} bits={bits} mode={mode} g={group}")
    qweight, scales, zeros, bias = stage_weights("mixed_gemm_cuda", n, x.dtype, qweight,
                                                 scales, zeros, bias)
    if dev != torch.cuda.current_device():
        # the library launches on (and sizes its workspace for) the current device
        with torch.cuda.device(dev):
            return mixed_gemm_cuda(x, qweight, scales, zeros, bias, bits, True, group_size,
                                   "none", layout, choice, out).reshape(*lead, n)
    lib = _lib(cfg)
    ws_bytes = _workspace_bytes(cfg, m, n, k, group, choice.decomposition, choice.splits, dev)
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = lib.qc_mixed_gemm_sm90(
        x2.data_ptr(), qweight.data_ptr(),
        scales.data_ptr() if mode == 2 else None,
        zeros.data_ptr() if mode == 2 else None,
        scales.data_ptr() if mode == 0 else None,
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(), m, n, k, group, choice.decomposition, choice.splits,
        ws.data_ptr(), ws_bytes, stream)
    if rc != 0:
        raise RuntimeError(f"qc_mixed_gemm_sm90 ({config_name(cfg)}, M={m} N={n} K={k} g={group}) "
                           f"failed with CUDA error {rc}")
    return out.reshape(*lead, n)
