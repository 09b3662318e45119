"""CPU tests of the Hopper mixed-GEMM weight preparation and config heuristic
(qcompile.kernels.mixed_gemm): the torch reorder against offsets printed by CuTe for the
kernel's layout, reorder round trips, the scale/zero folding of every format against the
reference op, and the heuristic's picks. Nothing here needs a GPU or nvcc.
"""

from __future__ import annotations

import dataclasses

import ctypes

import pytest
import torch

from qcompile.kernels import mixed_gemm as mg
from qcompile.kernels import ops


def _offsets(n: int, k: int, bits: int) -> torch.Tensor:
    order = mg.kernel_order(torch.arange(n * k).reshape(n, k), bits)
    off = torch.empty(n * k, dtype=torch.int64)
    off[order] = torch.arange(n * k)
    return off.reshape(n, k)


# Offsets of weight (n, k), k = 0..19, in CuTe's tile_to_shape(weight_reorder_atom, (32, 48))
# (csrc/mixed_gemm_sm90.cuh), printed by a host program built with nvcc 13.0 / CUTLASS 4.2.
CUTE_ROWS = {
    4: {0: [0, 4, 8, 12, 16, 20, 24, 28, 2, 6, 10, 14, 18, 22, 26, 30, 512, 516, 520, 524],
        9: [33, 37, 41, 45, 49, 53, 57, 61, 35, 39, 43, 47, 51, 55, 59, 63, 545, 549, 553, 557],
        16: [256, 260, 264, 268, 272, 276, 280, 284, 258, 262, 266, 270, 274, 278, 282, 286,
             768, 772, 776, 780]},
    8: {0: [0, 2, 8, 10, 16, 18, 24, 26, 4, 6, 12, 14, 20, 22, 28, 30, 512, 514, 520, 522],
        9: [33, 35, 41, 43, 49, 51, 57, 59, 37, 39, 45, 47, 53, 55, 61, 63, 545, 547, 553, 555],
        16: [256, 258, 264, 266, 272, 274, 280, 282, 260, 262, 268, 270, 276, 278, 284, 286,
             768, 770, 776, 778]},
}


@pytest.mark.parametrize("bits", [4, 8])
def test_reorder_matches_cute_offsets(bits):
    off = _offsets(32, 48, bits)
    for n, row in CUTE_ROWS[bits].items():
        assert off[n, :20].tolist() == row
    # a permutation of 0 .. N*K-1
    assert torch.equal(off.flatten().sort().values, torch.arange(32 * 48))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(16, 16), (48, 64), (272, 192)])
def test_reorder_round_trip(bits, n, k):
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int8)
    qw = mg.reorder_weight(q, bits)
    assert qw.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert tuple(qw.shape) == (n, k * bits // 8)  # N stays the leading dimension
    assert torch.equal(mg.unreorder_weight(qw, bits, k), q)


def test_reorder_rejects_unaligned():
    with pytest.raises(ValueError):
        mg.reorder_weight(torch.zeros(24, 64, dtype=torch.int8), 4)


FORMATS = [
    (4, True, 0, "none"), (4, True, 128, "none"), (4, False, 128, "sub"), (4, True, 64, "add"),
    (4, False, 256, "none"), (4, False, 0, "sub"), (8, True, 0, "none"), (8, False, 128, "sub"),
    (8, False, 0, "none"), (8, True, 64, "add"),
]


@pytest.mark.parametrize("bits,signed,group,zero_mode", FORMATS)
def test_prepared_matches_reference(bits, signed, group, zero_mode):
    # prepare_weight folds unsigned offsets and zero modes into q' * s + z' (or a row scale):
    # its PyTorch dequantization must give the reference op's result.
    n, k = 64, 512
    group = group or k
    g = torch.Generator().manual_seed(0)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int16)
    s = torch.rand(n, k // group, generator=g) + 0.1
    z = None
    if zero_mode == "sub":
        z = torch.randint(lo, hi, (n, k // group), generator=g).float()
    elif zero_mode == "add":
        z = torch.randn(n, k // group, generator=g)
    rowscale = signed and group == k and zero_mode == "none"
    layout = mg.LAYOUT_ROWSCALE if rowscale else mg.LAYOUT_GROUPZERO
    # fp16 storage of scales/zeros: the comparison tolerance covers its rounding
    qw, sc, zz = mg.prepare_weight(q, s, z, bits, signed, group, zero_mode, layout, torch.float16)
    x = torch.randn(7, k, generator=g)
    got = mg.reference_prepared(x, qw, sc, zz, None, bits, group, layout)
    want = ops.mixed_gemm_reference(x, ops.pack_nk(q, bits), s, z, None, bits, signed, group,
                                    zero_mode, torch.float32, "nk")
    err = ((got - want).norm() / want.norm()).item()
    assert err < 2e-3, err
    if layout == mg.LAYOUT_GROUPZERO:
        assert tuple(sc.shape) == tuple(zz.shape) == (k // group, n)
    else:
        assert sc.dtype == torch.float32 and sc.shape == (n,) and zz is None


def test_prepare_rejects_out_of_range():
    q = torch.full((16, 64), 9, dtype=torch.int16)
    s = torch.ones(16, 1)
    with pytest.raises(ValueError):
        mg.prepare_weight(q, s, None, 4, True, 64, "none", mg.LAYOUT_ROWSCALE, torch.bfloat16)


def test_select_layout_cpu_is_none():
    assert mg.select_layout(4, False, 128, "sub", 4096, 4096, torch.bfloat16, "cpu") is None


def test_configs_and_heuristic():
    names = [mg.config_name(c) for c in mg.CONFIGS]
    assert len(set(names)) == len(names)
    for act in ("bf16", "fp16"):
        for bits in (4, 8):
            for mode in (0, 2):
                for m in (1, 16, 17, 64, 65, 256, 2048):
                    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (16, 64)):
                        ch = mg.choose_config(m, n, k, act, bits, mode)
                        assert (ch.config.act, ch.config.bits, ch.config.mode) == (act, bits, mode)
                        assert ch.splits >= 1
                        assert ch.config.streamk or ch.decomposition == mg.DECOMP_DATA_PARALLEL
                        # the pingpong tile only for one wave over a short K loop
                        assert ch.config.coop or (m, n, k) == (256, 4096, 4096) or (
                            bits == 4 and (m, n, k) == (64, 4096, 4096))
                        if act == "fp16":  # fp16 (AWQ) runs the tiles and choices of bf16
                            bf = mg.choose_config(m, n, k, "bf16", bits, mode)
                            assert dataclasses.replace(bf.config, act="fp16") == ch.config
                            assert (bf.splits, bf.decomposition) == (ch.splits, ch.decomposition)
    # decode on a narrow layer: small token tile, K split over otherwise idle SMs
    ch = mg.choose_config(1, 4096, 4096, "bf16", 4, 2)
    assert ch.config.tile_n == 16 and ch.decomposition == mg.DECOMP_SPLIT_K and ch.splits == 4
    ch = mg.choose_config(16, 14336, 4096, "bf16", 4, 2)
    assert ch.config.tile_n == 16 and ch.decomposition == mg.DECOMP_DATA_PARALLEL
    assert mg.choose_config(2048, 14336, 4096, "bf16", 4, 2).config.tile_n >= 128
    # prefill on wide layers: the 2x1-cluster build of the data-parallel tile; narrow: none
    for bits, mode in ((4, 2), (8, 0)):
        assert mg.choose_config(2048, 14336, 4096, "bf16", bits, mode).config.cluster_m == 2
        assert mg.choose_config(2048, 4096, 14336, "bf16", bits, mode).config.cluster_m == 1
    assert mg.choose_config(2048, 14336, 4096, "fp16", 4, 2).config.cluster_m == 2
    # the prefill cost model (whole waves of tiles): 4096 rows (32 row tiles) on 132 SMs take
    # 256-token tiles at M = 1024 (128 tiles, one wave), 192-token tiles at M = 768 (128 tiles
    # where 256 leave 96), the 256-token tile under stream-K at M = 1280 (160 tiles)
    for bits, mode in ((4, 2), (8, 0)):
        for k in (4096, 14336):
            ch = mg.choose_config(1024, 4096, k, "bf16", bits, mode)
            assert (ch.config.tile_n, ch.config.streamk) == (256, False)
            ch = mg.choose_config(768, 4096, k, "bf16", bits, mode)
            assert (ch.config.tile_n, ch.config.streamk) == (192, False)
            ch = mg.choose_config(1280, 4096, k, "bf16", bits, mode)
            assert (ch.config.tile_n, ch.decomposition) == (256, mg.DECOMP_STREAM_K)
        # one part-full wave with a short K loop never streams (6144 rows, M = 512: 96 tiles)
        assert not mg.choose_config(512, 6144, 4096, "bf16", bits, mode).config.streamk
        # 14336 rows: 256-token tiles (on the cluster) at M = 1024, 192 at M = 1536
        assert mg.choose_config(1024, 14336, 4096, "bf16", bits, mode).config.tile_n == 256
        assert mg.choose_config(1536, 14336, 4096, "bf16", bits, mode).config.tile_n == 192
    # prefill with too few 128-token tiles for half the SMs: the 128x128 stream-K build
    # splits K (32 x 2 tiles x 2 splits), for both common formats
    for bits, mode in ((4, 2), (8, 0)):
        ch = mg.choose_config(256, 4096, 14336, "bf16", bits, mode)
        assert (ch.config.tile_m, ch.config.tile_n, ch.config.streamk) == (128, 128, True)
        assert ch.decomposition == mg.DECOMP_SPLIT_K and ch.splits == 2
    # one wave of 64x128 pingpong tiles over a short K loop instead of splitting K (64 row
    # tiles x 2 token tiles = 128 CTAs at M = 256), where the last token tile is nearly full
    for bits, mode in ((4, 2), (8, 0)):
        for m, n, k in ((256, 4096, 4096), (224, 4096, 4096), (384, 2048, 4096),
                        (1024, 1024, 4096), (128, 6144, 4096), (256, 4096, 2048)):
            ch = mg.choose_config(m, n, k, "bf16", bits, mode)
            assert (ch.config.tile_m, ch.config.tile_n, ch.config.coop) == (64, 128, False)
            assert ch.decomposition == mg.DECOMP_DATA_PARALLEL
        for m, n, k in ((200, 4096, 4096),    # 128 pads 56; 80 / 96 make 192 tiles
                        (128, 4096, 4096),    # 64 tiles: under half the SMs
                        (256, 4096, 8192),    # a long K loop
                        (256, 6144, 4096)):   # 192 tiles: more than one wave
            assert mg.choose_config(m, n, k, "bf16", bits, mode).config.coop
    assert not mg.choose_config(256, 4096, 4096, "fp16", 4, 2).config.coop  # as bf16
    # 128-deep in K for group-wise int4 where the groups allow it, else 64-deep
    for group, depth in ((128, 128), (256, 128), (64, 64)):
        ch = mg.choose_config(256, 4096, 4096, "bf16", 4, 2, group_size=group)
        assert (ch.config.tile_m, ch.config.tile_k) == (64, depth)
    assert mg.choose_config(256, 4096, 4096, "bf16", 8, 0).config.tile_k == 64
    # 17-64 tokens: the 32- / 64-token pingpong tiles (128-deep) where 64-row tiles make one
    # wave of half the SMs or more (6144 rows: 96 tiles; 8192: 128), padding <= 32 tokens
    for bits, mode in ((4, 2), (8, 0)):
        for m, tile_n in ((17, 32), (24, 32), (32, 32), (33, 64), (40, 64), (64, 64)):
            for n in (6144, 8192):
                ch = mg.choose_config(m, n, 4096, "bf16", bits, mode, group_size=128)
                assert (ch.config.tile_m, ch.config.tile_n, ch.config.tile_k) == (64, tile_n, 128)
                assert not ch.config.coop and ch.decomposition == mg.DECOMP_DATA_PARALLEL
        for m, n, k in ((16, 6144, 4096),    # under 17 tokens (not measured)
                        (64, 6144, 14336),   # a long K loop
                        (32, 4096, 4096),    # 64 tiles of 32 tokens: under half the SMs
                        (64, 2048, 4096),    # 64 tiles of 32 tokens in two: the same
                        (65, 4096, 4096),    # three 32-token tiles (not measured)
                        (64, 14336, 4096)):  # 224 tiles: more than one wave
            assert mg.choose_config(m, n, k, "bf16", bits, mode, group_size=128).config.coop
        # int4, 33-64 tokens where the 64-token tile makes under half the SMs' tiles (4096 rows:
        # 64): the 32-token tile in two token tiles (128, a nearly full wave), data-parallel;
        # not in a part-full wave (3072 rows: 96), nor for int8 (not measured)
        for m, n in ((33, 4096), (48, 4096), (64, 4096), (64, 3072)):
            ch = mg.choose_config(m, n, 4096, "bf16", bits, mode, group_size=128)
            halves = bits == 4 and n == 4096
            assert (ch.config.tile_m, ch.config.tile_n, ch.config.coop) == (
                (64, 32, False) if halves else (128, ch.config.tile_n, True)), (bits, m, n)
            assert (ch.decomposition == mg.DECOMP_DATA_PARALLEL) == halves
    # 80 / 96-token pingpong tiles: the one holding 65-96 tokens, and two of them where two
    # 128-token tiles would pad more than 32 tokens (129-192 tokens on 4096 rows); several
    # token tiles never of the 32 / 64-token ones (1024 rows, 256 tokens: split K)
    for bits, mode in ((4, 2), (8, 0)):
        for m, n, tile_n in ((72, 6144, 80), (88, 6144, 96), (80, 8192, 80), (136, 4096, 80),
                             (160, 4096, 96), (192, 4096, 96), (320, 2048, 80)):
            ch = mg.choose_config(m, n, 4096, "bf16", bits, mode, group_size=128)
            assert (ch.config.tile_m, ch.config.tile_n, ch.config.coop) == (64, tile_n, False)
        assert mg.choose_config(256, 1024, 4096, "bf16", bits, mode, group_size=128).config.coop
    # group 64: no 128-deep small pingpong tile, and the 64x128 one is a quarter full
    assert mg.choose_config(32, 6144, 4096, "bf16", 4, 2, group_size=64).config.coop
    # enough output tiles: the data-parallel build of the same tile
    ch = mg.choose_config(512, 4096, 4096, "bf16", 4, 2)
    assert (ch.config.tile_n, ch.config.streamk) == (128, False)
    # no token tile wider than the narrowest that holds M; at most two token tiles a split
    ch = mg.choose_config(128, 14336, 4096, "bf16", 4, 2)
    assert (ch.config.tile_n, ch.config.streamk) == (128, False)
    ch = mg.choose_config(128, 4096, 4096, "bf16", 8, 0)
    assert ch.config.tile_n == 64 and ch.decomposition == mg.DECOMP_SPLIT_K and ch.splits == 2
    # K split on few row tiles: per-channel int8 takes two token tiles and fewer splits ...
    for m, tile_n in ((32, 16), (64, 32)):
        for k in (4096, 14336):
            ch = mg.choose_config(m, 4096, k, "bf16", 8, 0)
            assert (ch.config.tile_n, ch.decomposition, ch.splits) == (tile_n, mg.DECOMP_SPLIT_K, 2)
    # ... but not where the two token tiles leave K whole (enough row tiles for the SMs)
    assert mg.choose_config(64, 14336, 4096, "bf16", 8, 0).config.tile_n == 64
    # ... group-wise int4 one token tile and more splits where each split stays deep
    # (K = 14336: 56 K tiles a split), else two (K = 4096: 16 K tiles with one)
    ch = mg.choose_config(128, 4096, 14336, "bf16", 4, 2)
    assert (ch.config.tile_n, ch.decomposition, ch.splits) == (128, mg.DECOMP_SPLIT_K, 4)
    ch = mg.choose_config(128, 4096, 4096, "bf16", 4, 2)
    assert (ch.config.tile_n, ch.decomposition, ch.splits) == (64, mg.DECOMP_SPLIT_K, 2)
    ch = mg.choose_config(64, 2048, 4096, "bf16", 4, 2)
    assert (ch.config.tile_n, ch.decomposition, ch.splits) == (64, mg.DECOMP_SPLIT_K, 8)
    # the deeper K tile of a tile built both ways, where the group size allows it; autotuning
    # times only that one
    assert mg.choose_config(64, 4096, 4096, "bf16", 4, 2, group_size=128).config.tile_k == 128
    assert mg.choose_config(64, 4096, 4096, "bf16", 4, 2, group_size=64).config.tile_k == 64
    assert mg.choose_config(32, 4096, 4096, "bf16", 8, 0).config.tile_k == 128
    for group, depth in ((128, 128), (64, 64)):
        names = mg.candidates(64, 4096, 4096, "bf16", 4, group, mg.LAYOUT_GROUPZERO)
        small = [mg.choice_from_name(n).config for n in names if not n.startswith("decode.")]
        assert {c.tile_k for c in small if c.streamk and c.tile_n <= 64} == {depth}
    # a group size must be a multiple of the chosen config's K tile
    for group in (32, 64, 128, 4096):
        for c in mg._family("bf16", 4, 2, group, 4096):
            assert group == 4096 or group % c.tile_k == 0
    if not mg._family("bf16", 4, 2, 32, 4096):
        with pytest.raises(ValueError):
            mg.choose_config(1, 4096, 4096, "bf16", 4, 2, group_size=32)


def test_cached_library_offsets_match():
    # Where the kernel library is already built (a dev machine), its CuTe layout must equal
    # the torch reorder; nothing is compiled here.
    from qcompile.kernels.build import KernelSpec, cached_path
    for bits in (4, 8):
        cfg = next(c for c in mg.CONFIGS if c.bits == bits)
        path = cached_path(KernelSpec(mg.SOURCE, cfg.defines(), "sm_90a"))
        if path is None:
            pytest.skip("kernel library not built")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:  # no CUDA runtime on this machine
            pytest.skip(f"cannot load {path.name}: {e}")
        n, k = 48, 320
        offs = torch.empty(n * k, dtype=torch.int64)
        lib.qc_mixed_gemm_sm90_offsets.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        assert lib.qc_mixed_gemm_sm90_offsets(n, k, offs.data_ptr()) == 0
        assert torch.equal(offs.reshape(n, k), _offsets(n, k, bits))
