"""CPU tests of the sm80 mixed-GEMM family's weight preparation and heuristic
(qcompile.kernels.mixed_gemm_sm80): prepare/unprepare round trips for every shape class,
the byte layout the kernel reads (hand-computed cases), the scale/zero folding against the
reference op, and the configs. Nothing here needs a GPU or nvcc.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from qcompile.kernels import mixed_gemm_decode as dec
from qcompile.kernels import mixed_gemm_sm80 as m80
from qcompile.kernels import ops, run_family


def _format(n, k, bits, signed, group, zero_mode, act, seed=0):
    """Random q, scales representable in `act`, zeros; all float32 / int16 on CPU."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int16)
    groups = k // group
    s = (torch.rand(n, groups, generator=g) + 0.05).to(act).float()
    z = None
    if zero_mode == "sub":
        z = torch.randint(lo, hi, (n, groups), generator=g).float()
    elif zero_mode == "add":
        z = torch.randn(n, groups, generator=g)
    return q, s, z


def _layout(bits, signed, group, zero_mode, k):
    rowscale = bits == 8 and signed and group == k and zero_mode == "none"
    return m80.LAYOUT_ROWSCALE if rowscale else m80.LAYOUT_GROUPZERO


# (N, K): the kernel's alignment limits (N % 8, K % 16) and the format's own (K even)
SHAPES = [(8, 16), (24, 48), (40, 272), (8, 2), (3, 6)]
FORMATS = [
    (True, "none"), (False, "none"), (False, "sub"), (True, "add"), (False, "add"), (True, "sub"),
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("signed,zero_mode", FORMATS)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_round_trip(bits, n, k, signed, zero_mode, act):
    for group in sorted({d for d in (2, 16, 32, 64, 128, k) if k % d == 0}):
        q, s, z = _format(n, k, bits, signed, group, zero_mode, act, seed=group)
        layout = _layout(bits, signed, group, zero_mode, k)
        qw, sc, zz = m80.prepare_weight(q, s, z, bits, signed, group, zero_mode, layout, act)
        assert qw.dtype == (torch.uint8 if bits == 4 else torch.int8)
        assert tuple(qw.shape) == (n, k * bits // 8)  # N stays the leading dimension
        q2, s2, z2 = m80.unprepare_weight(qw, sc, zz, bits, signed, zero_mode, layout)
        assert torch.equal(q2, q), (group, layout)
        assert torch.equal(s2, s), (group, layout)
        if z is None:
            assert z2 is None
        else:
            # z' = (off - z) * s or off * s + z is stored in `act`: recovered up to its rounding
            tol = 2 ** -7 if act == torch.bfloat16 else 2 ** -10
            unit = 1.0 if zero_mode == "sub" else s  # "sub" zeros are in q units
            bound = tol * (z.abs() + (1 << bits) * unit) + 1e-6
            assert ((z2 - z).abs() <= bound).all(), (group, layout)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_extremes(bits):
    # every value of the range, both signednesses, on the smallest aligned shape
    for signed in (True, False):
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        q = torch.arange(lo, hi + 1, dtype=torch.int16).repeat(8 * 256 // (hi - lo + 1))
        q = q.reshape(8, -1)
        k = q.shape[1]
        s = torch.ones(8, 1)
        layout = _layout(bits, signed, k, "none", k)
        qw, sc, zz = m80.prepare_weight(q, s, None, bits, signed, k, "none", layout, torch.bfloat16)
        assert torch.equal(m80.unprepare_weight(qw, sc, zz, bits, signed, "none", layout)[0], q)


def test_unsigned_int8_in_int8_tensor():
    # unsigned bytes handed over as int8 (a uint8 reinterpretation) must read as 0..255
    q = torch.tensor([[0, 255, 128, 127] * 4] * 8, dtype=torch.uint8)
    s = torch.ones(8, 1)
    qw, sc, zz = m80.prepare_weight(q.view(torch.int8), s, None, 8, False, 16, "none",
                                    m80.LAYOUT_GROUPZERO, torch.float16)
    assert qw[0, :4].tolist() == [-128, 127, 0, -1]
    assert torch.equal(m80.unprepare_weight(qw, sc, zz, 8, False, "none",
                                            m80.LAYOUT_GROUPZERO)[0], q.to(torch.int16))


def test_hand_computed_bytes():
    # int4: element k in the low nibble of byte k // 2 for even k (cutlass::int4b_t order)
    q = torch.tensor([[1, -2, 3, -8], [7, 0, -1, 5]], dtype=torch.int16)
    qw, _, _ = m80.prepare_weight(q, torch.ones(2, 1), None, 4, True, 4, "none",
                                  m80.LAYOUT_GROUPZERO, torch.bfloat16)
    assert qw.tolist() == [[0xE1, 0x83], [0x07, 0x5F]]
    # unsigned int4 is shifted by 8 before packing: [0, 15, 8, 7] -> [-8, 7, 0, -1]
    q = torch.tensor([[0, 15, 8, 7]], dtype=torch.int16)
    s = torch.tensor([[0.5]])
    qw, sc, zz = m80.prepare_weight(q, s, None, 4, False, 4, "none", m80.LAYOUT_GROUPZERO,
                                    torch.bfloat16)
    assert qw.tolist() == [[0x78, 0xF0]]
    assert sc.tolist() == [[0.5]] and zz.tolist() == [[4.0]]  # z' = 8 * s: w = q' * s + z'
    # "sub" zeros: z' = (8 - z) * s
    qw, sc, zz = m80.prepare_weight(q, s, torch.tensor([[3.0]]), 4, False, 4, "sub",
                                    m80.LAYOUT_GROUPZERO, torch.float16)
    assert zz.tolist() == [[2.5]]


def test_rowscale_is_the_kernels_b_operand():
    # The kernel reads qweight as CUTLASS's B, column-major [K, N]: element (k, n) at byte
    # n * K + k; one 128-bit cp.async chunk c of row n holds q[n, 16c .. 16c + 15].
    n, k = 16, 64
    q, s, _ = _format(n, k, 8, True, k, "none", torch.float32)
    qw, sc, zz = m80.prepare_weight(q, s, None, 8, True, k, "none", m80.LAYOUT_ROWSCALE,
                                    torch.bfloat16)
    assert qw.is_contiguous() and qw.dtype == torch.int8 and zz is None
    flat = qw.flatten()
    for nn, kk in ((0, 0), (3, 17), (15, 63), (9, 40)):
        assert flat[nn * k + kk] == q[nn, kk]
    chunks = flat.reshape(n, k // 16, 16)
    assert torch.equal(chunks[5, 2], q[5, 32:48].to(torch.int8))
    assert sc.dtype == torch.float32 and tuple(sc.shape) == (n,) and torch.equal(sc, s.reshape(n))


def test_rowscale_rejects_other_formats():
    q = torch.zeros(8, 32, dtype=torch.int16)
    for bits, signed, group, zero_mode in ((4, True, 32, "none"), (8, False, 32, "none"),
                                           (8, True, 16, "none"), (8, True, 32, "add")):
        with pytest.raises(ValueError):
            m80.prepare_weight(q, torch.ones(8, 32 // group), torch.zeros(8, 32 // group), bits,
                               signed, group, zero_mode, m80.LAYOUT_ROWSCALE, torch.bfloat16)


def test_prepare_rejects_bad_input():
    s = torch.ones(8, 1)
    with pytest.raises(ValueError):  # out of the signed 4-bit range
        m80.prepare_weight(torch.full((8, 16), 8, dtype=torch.int16), s, None, 4, True, 16,
                           "none", m80.LAYOUT_GROUPZERO, torch.bfloat16)
    with pytest.raises(ValueError):  # group does not divide K
        m80.prepare_weight(torch.zeros(8, 48, dtype=torch.int16), torch.ones(8, 2), None, 8,
                           True, 32, "none", m80.LAYOUT_GROUPZERO, torch.bfloat16)
    with pytest.raises(ValueError):
        m80.prepare_weight(torch.zeros(8, 16, dtype=torch.int16), s, None, 8, True, 16, "none",
                           "sm90_mixed_v1_rowscale", torch.bfloat16)


PREPARED = [
    (8, True, 0, "none"), (8, False, 0, "sub"), (8, False, 128, "sub"), (8, True, 64, "add"),
    (4, True, 0, "none"), (4, False, 128, "sub"), (4, True, 32, "add"), (4, False, 256, "none"),
]


@pytest.mark.parametrize("bits,signed,group,zero_mode", PREPARED)
def test_prepared_matches_reference(bits, signed, group, zero_mode):
    # the prepared operands, dequantized the way the kernel computes them, give the
    # reference op's result on the "nk" layout
    n, k = 24, 512
    group = group or k
    q, s, z = _format(n, k, bits, signed, group, zero_mode, torch.float32, seed=1)
    layout = _layout(bits, signed, group, zero_mode, k)
    qw, sc, zz = m80.prepare_weight(q, s, z, bits, signed, group, zero_mode, layout, torch.float16)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2))
    got = m80.reference_prepared(x, qw, sc, zz, None, bits, group, layout)
    want = ops.mixed_gemm_reference(x, ops.pack_nk(q, bits), s, z, None, bits, signed, group,
                                    zero_mode, torch.float32, "nk")
    err = ((got - want).norm() / want.norm()).item()
    assert err < 2e-3, err


def test_select_layout_cpu_is_none():
    assert m80.select_layout(8, True, 4096, "none", 4096, 4096, torch.bfloat16, "cpu") is None


def test_configs():
    names = [m80.config_name(c) for c in m80.CONFIGS]
    assert len(set(names)) == len(names)
    for c in m80.CONFIGS:
        (tm, tn, tk), (wm, wn, wk) = c.tile, c.warp
        assert tm % wm == 0 and tn % wn == 0 and tk % wk == 0
        assert (tm // wm) * (tn // wn) * (tk // wk) in (4, 8)  # 128 or 256 threads
        assert wm % 16 == 0 and wn % 8 == 0 and tk % 64 == 0  # m16n8k16 MMAs, 64-byte int8 rows
        assert c.defines()["QC_ACT_FP16"] == int(c.act == "fp16")
        if c.mode == "rs":
            # pipeline smem (bf16 x tile + int8 w tile per stage) within sm_86/89's 99 KiB
            assert c.bits == 8 and c.stages * (tm * tk * 2 + tn * tk) <= 99 * 1024
        else:
            assert c.mode == "gz" and c.bits in (4, 8) and tk == 64
            assert wn % m80.N_ALIGN_V2[c.bits] == 0  # whole weight blocks per warp
            assert c.smem_bytes() <= 99 * 1024
            assert c.defines()["QC_WBITS"] == c.bits
            assert c.info()[5:7] == [tm // wm, tn // wn]
    for act in ("bf16", "fp16"):
        for bits, mode in ((8, "rs"), (4, "gz"), (8, "gz")):
            tiles = {c.tile[0] for c in m80.CONFIGS if (c.act, c.bits, c.mode) == (act, bits, mode)}
            assert tiles >= {16, 32, 64, 128}, (act, bits, mode)  # decode and prefill tiles


def test_heuristic():
    for act in ("bf16", "fp16"):
        for m in (1, 16, 17, 32, 33, 64, 65, 256, 2048):
            for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (16, 64)):
                ch = m80.choose_config(m, n, k, act, 108)
                assert ch.config.act == act and ch.splits >= 1
                if m <= 64:
                    assert ch.config.tile[0] >= m
                    assert ch.config.tile[0] == min(c.tile[0] for c in m80.CONFIGS
                                                    if c.tile[0] >= m)
                if ch.decomposition == m80.DECOMP_SPLIT_K:
                    assert 2 <= ch.splits <= 16 and k // ch.config.tile[2] >= 8 * ch.splits
                else:
                    assert ch.decomposition == m80.DECOMP_DATA_PARALLEL and ch.splits == 1
    # decode on a 4096-wide layer: 16-token tile, K split over otherwise idle SMs
    ch = m80.choose_config(1, 4096, 4096, "bf16", 108)
    assert ch.config.tile[0] == 16 and ch.decomposition == m80.DECOMP_SPLIT_K and ch.splits == 3
    assert m80.choose_config(2048, 14336, 4096, "bf16", 108).config.tile[0] == 128


def test_cached_library_info():
    # Where the kernel libraries are already built, each reports the configuration it was
    # built for (a host function; loading needs the CUDA runtime library, not a GPU).
    from qcompile.kernels.build import cached_path
    paths = {c: cached_path(m80.kernel_spec(c)) for c in m80.CONFIGS}
    if all(p is None for p in paths.values()):
        pytest.skip("kernel libraries not built")
    for cfg, path in paths.items():
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            pytest.skip(f"cannot load {path.name}: {e}")
        info = (ctypes.c_int * 9)()
        fn = lib.qc_mixed_gemm_sm80_info if cfg.mode == "rs" else lib.qc_mixed_gemm_gz_sm80_info
        assert fn(info, 9) == (8 if cfg.mode == "rs" else 9)
        assert list(info)[:8] == cfg.info(), m80.config_name(cfg)
        if cfg.mode == "gz":
            assert info[8] == cfg.smem_bytes(), m80.config_name(cfg)


# --- layout v2 (group-wise kernel) --------------------------------------------------------

V2 = m80.LAYOUT_GROUPZERO_V2
# (N, K) at the v2 alignment limits: K % 64, N % 16 (int4) / N % 8 (int8)
V2_SHAPES = {4: [(16, 64), (48, 192), (144, 320), (16, 1024)],
             8: [(8, 64), (24, 128), (136, 320), (8, 1024)]}


def _v2_groups(k):
    return [g for g in (16, 32, 64, 128, 256, k) if m80.group_ok(g, k)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed,zero_mode", FORMATS)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_v2_round_trip(bits, signed, zero_mode, act):
    for n, k in V2_SHAPES[bits]:
        for group in dict.fromkeys(_v2_groups(k)):
            q, s, z = _format(n, k, bits, signed, group, zero_mode, act, seed=group + n)
            qw, sc, zz = m80.prepare_weight(q, s, z, bits, signed, group, zero_mode, V2, act)
            assert qw.dtype == torch.uint8 and tuple(qw.shape) == (n, k * bits // 8)
            assert sc.dtype == act and tuple(sc.shape) == (k // group, n)
            assert zz is not None and zz.dtype == act and tuple(zz.shape) == (k // group, n)
            q2, s2, z2 = m80.unprepare_weight(qw, sc, zz, bits, signed, zero_mode, V2)
            assert torch.equal(q2, q), (n, k, group)
            assert torch.equal(s2, s), (n, k, group)
            if z is None:
                assert z2 is None
            else:
                tol = 2 ** -7 if act == torch.bfloat16 else 2 ** -10
                unit = 1.0 if zero_mode == "sub" else s
                bound = tol * (z.abs() + (1 << bits) * unit) + 1e-6
                assert ((z2 - z).abs() <= bound).all(), (n, k, group)


@pytest.mark.parametrize("bits", [4, 8])
def test_v2_pack_is_a_permutation(bits):
    # every element lands exactly once; the rows of a weight block stay in that block's rows
    n, k = 2 * m80.N_ALIGN_V2[bits], 128
    idx = torch.arange(n * k).reshape(n, k)
    flat = m80.v2_order(idx, bits)
    assert torch.equal(flat.sort().values, torch.arange(n * k))
    rows = (flat // k).reshape(n, -1)
    blk = m80.N_ALIGN_V2[bits]
    for r in range(n):
        assert (rows[r] // blk == r // blk).all()


def _lane_values(bits, lane, ks, n, k):
    """(n, k) of the values in 32-bit word ks of lane `lane`'s 16 bytes in block (0, 0), in
    word position order (int4: nibble 0..7, int8: byte 0..3)."""
    idx = torch.arange(n * k).reshape(n, k)
    flat = m80.v2_order(idx, bits)
    per_lane = 32 if bits == 4 else 16
    vals = flat[lane * per_lane:(lane + 1) * per_lane].reshape(4, -1)[ks]
    return [(int(v) // k, int(v) % k) for v in vals]


def test_v2_lane_owns_its_mma_fragments():
    # mma.sync.m16n8k16 B fragment of lane (g, t): reg b0 = (k 2t, 2t+1), b1 = (2t+8, 2t+9),
    # n = g. int4 word: nibble pairs (i, i+4) = [col0 b0, col0 b1, col1 b0, col1 b1];
    # int8 word: byte pairs (0, 2) = b0, (1, 3) = b1.
    for lane in range(32):
        g, t = divmod(lane, 4)
        for ks in range(4):
            base = 16 * ks
            v4 = _lane_values(4, lane, ks, 16, 64)
            for i, (col, reg) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                kk = base + 2 * t + 8 * reg
                assert v4[i] == (g + 8 * col, kk) and v4[i + 4] == (g + 8 * col, kk + 1)
            v8 = _lane_values(8, lane, ks, 8, 64)
            for reg in (0, 1):
                kk = base + 2 * t + 8 * reg
                assert v8[reg] == (g, kk) and v8[reg + 2] == (g, kk + 1)


def test_v2_hand_computed_bytes():
    # int4: stored nibble u = q' + 8 (= q for unsigned formats). Lane 0, word 0 of block 0:
    # nibbles (n, k) = (0,0) (0,8) (8,0) (8,8) (0,1) (0,9) (8,1) (8,9).
    q = torch.zeros(16, 64, dtype=torch.int16)
    q[0, 0], q[0, 8], q[8, 0], q[8, 8], q[0, 1], q[0, 9], q[8, 1], q[8, 9] = 1, 2, 3, 4, 5, 6, 7, 15
    qw, sc, zz = m80.prepare_weight(q, torch.ones(16, 1), None, 4, False, 64, "none", V2,
                                    torch.float16)
    word = int.from_bytes(bytes(qw.flatten()[:4].tolist()), "little")
    assert word == 0xF7654321
    assert torch.equal(zz, torch.full((1, 16), 8.0, dtype=torch.float16))  # z' = 8 * s
    # signed int4 is biased by 8: q' = -8 -> nibble 0, 7 -> 15, 0 -> 8
    q = torch.zeros(16, 64, dtype=torch.int16)
    q[0, 0], q[0, 8] = -8, 7
    qw, _, zz = m80.prepare_weight(q, torch.ones(16, 1), None, 4, True, 64, "none", V2,
                                   torch.bfloat16)
    assert qw.flatten()[:4].tolist() == [0xF0, 0x88, 0x88, 0x88]
    assert not zz.any()
    # int8: bytes (n, k) = (0,0) (0,8) (0,1) (0,9), biased by 128
    q = torch.zeros(8, 64, dtype=torch.int16)
    q[0, 0], q[0, 8], q[0, 1], q[0, 9] = -128, 127, 1, -1
    qw, _, _ = m80.prepare_weight(q, torch.ones(8, 1), None, 8, True, 64, "none", V2,
                                  torch.bfloat16)
    assert qw.flatten()[:4].tolist() == [0, 255, 129, 127]
    # block (nb, kb) at byte (nb * K/64 + kb) * 512: element (n=8, k=64) of int8 [16, 128] is
    # lane 0 word 0 byte 0 of block (1, 1)
    q = torch.zeros(16, 128, dtype=torch.int16)
    q[8, 64] = 5
    qw, _, _ = m80.prepare_weight(q, torch.ones(16, 1), None, 8, True, 128, "none", V2,
                                  torch.bfloat16)
    assert int(qw.flatten()[(1 * 2 + 1) * 512]) == 133


def test_v2_rejects_bad_shapes():
    bf = torch.bfloat16
    cases = [(4, 16, 96, 32), (4, 24, 128, 64), (4, 16, 192, 48), (8, 12, 64, 64), (8, 8, 64, 8)]
    for bits, n, k, group in cases:
        assert not m80.v2_shape_ok(bits, n, k, group)
        with pytest.raises(ValueError):
            m80.prepare_weight(torch.zeros(n, k, dtype=torch.int16), torch.ones(n, k // group),
                               None, bits, True, group, "none", V2, bf)


V2_PREPARED = [
    (4, False, 64, "sub"), (4, False, 128, "sub"), (4, True, 128, "none"), (4, False, 32, "add"),
    (4, True, 16, "none"), (4, False, 0, "sub"), (8, True, 0, "none"), (8, False, 0, "sub"),
    (8, True, 128, "none"), (8, False, 64, "sub"), (8, True, 256, "add"), (8, False, 32, "none"),
]


@pytest.mark.parametrize("bits,signed,group,zero_mode", V2_PREPARED)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_v2_prepared_matches_dequantize(bits, signed, group, zero_mode, act):
    # the prepared operands, dequantized the way the kernel computes them (q' * s + z' in the
    # activation dtype), give x @ W.T with W from ops.dequantize of the original operands
    n, k = 48, 512
    group = group or k
    q, s, z = _format(n, k, bits, signed, group, zero_mode, act, seed=3)
    qw, sc, zz = m80.prepare_weight(q, s, z, bits, signed, group, zero_mode, V2, act)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(4)).to(act).float()
    got = m80.reference_prepared(x, qw, sc, zz, None, bits, group, V2)
    w = ops.dequantize(ops.pack_nk(q, bits), s.double(), None if z is None else z.double(), bits,
                       signed, group, zero_mode, torch.float64)
    want = x.double() @ w.t()
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 2e-3, err
    # and the kernel's arithmetic in the activation dtype: w = fma(q', s, z') rounded once
    qs = m80.unpack_v2(qw, bits).to(torch.float32)
    s_full = sc.float().t().repeat_interleave(group, dim=1)
    z_full = zz.float().t().repeat_interleave(group, dim=1)
    w_act = (qs * s_full + z_full).to(act).double()
    err = ((x.double() @ w_act.t() - want).norm() / want.norm()).item()
    assert err < (1e-2 if act == torch.bfloat16 else 5e-3), err


def test_select_layout_v2_cpu_is_none():
    assert m80.select_layout(4, False, 128, "sub", 4096, 4096, torch.bfloat16, "cpu") is None


def test_choice_names_round_trip():
    seen = set()
    for cfg in m80.CONFIGS:
        choices = [m80.Choice(cfg), m80.Choice(cfg, m80.DECOMP_SPLIT_K, 2),
                   m80.Choice(cfg, m80.DECOMP_SPLIT_K, 8)]
        if cfg.mode == "rs":
            choices += [m80.Choice(cfg, m80.DECOMP_STREAM_K), m80.Choice(cfg, m80.DECOMP_HEURISTIC)]
        for ch in choices:
            name = m80.choice_name(ch)
            assert name.startswith(f"sm80.{cfg.act}.w{cfg.bits}.{cfg.mode}.") and name not in seen
            seen.add(name)
            assert m80.choice_from_name(name) == ch
    for bad in ("", "sm80.bf16.w4.gz.16x128x64.s4/sk1", "sm80.bf16.w4.gz.16x128x64.s4/streamk",
                "sm80.bf16.w4.gz.16x128x64.s9/dp", "bf16.w4.gz.128x16x64.coop.sk/sk4"):
        with pytest.raises(ValueError):
            m80.choice_from_name(bad)


@pytest.mark.parametrize("layout,bits", [(m80.LAYOUT_ROWSCALE, 8), (V2, 4), (V2, 8)])
def test_candidates(layout, bits):
    for act in ("bf16", "fp16"):
        for m in (1, 16, 17, 64, 65, 256, 2048):
            for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (16, 64)):
                names = m80.candidates(m, n, k, act, bits, 128, layout, 132)
                assert len(set(names)) == len(names)
                mode = "rs" if layout == m80.LAYOUT_ROWSCALE else "gz"
                first = m80.heuristic_choice(m, n, k, act, 132, bits, mode, 128)
                assert names[0] == m80.choice_name(first)
                # the decode kernel's launch shapes where it reads the layout (v2, m <= 32)
                decode_names = [c for c in names if dec.is_name(c)]
                assert bool(decode_names) == (mode == "gz" and m <= dec.MAX_TOKENS and k % 128 == 0)
                for name in decode_names:
                    ch = m80.choice_from_name(name)
                    assert ch.valid() and ch.tokens >= m and n % ch.rows == 0
                names = [c for c in names if not dec.is_name(c)]
                assert 1 <= len(names) <= 8
                for name in names:
                    ch = m80.choice_from_name(name)
                    assert (ch.config.act, ch.config.bits, ch.config.mode) == (act, bits, mode)
                    if m <= 64:  # no token tile wider than needed (32 is always a candidate)
                        fit = min(c.tile[0] for c in m80.CONFIGS if c.tile[0] >= m)
                        assert ch.config.tile[0] <= max(32, fit)
    assert m80.candidates(1, 4096, 4096, "bf16", 4, 128, m80.LAYOUT_GROUPZERO, 132) == []


def test_describe():
    for layout, bits in ((m80.LAYOUT_ROWSCALE, 8), (V2, 4)):
        for m in (None, 1, 2048):
            line = m80.describe(layout, m, 4096, 4096, torch.bfloat16, "cpu", bits, 128)
            assert line.startswith("cutlass sm80 ")
            assert "sm80.bf16" in line or (m == 1 and layout == V2 and "decode." in line)
    assert "w4.gz.16x128" in m80.describe(V2, 16, 4096, 4096, torch.bfloat16, "cpu", 4, 128)
    line = m80.describe(V2, 1, 4096, 4096, torch.bfloat16, "cpu", 4, 128)
    assert "decode.t8.r32" in line and "mma.sync decode kernel" in line  # M <= DECODE_MAX_M


def test_run_falls_back_on_cpu():
    # the op body on CPU tensors: the kernels are CUDA-only, the PyTorch path gives the same numbers
    n, k, group = 32, 256, 64
    q, s, z = _format(n, k, 4, False, group, "sub", torch.bfloat16, seed=9)
    qw, sc, zz = m80.prepare_weight(q, s, z, 4, False, group, "sub", V2, torch.bfloat16)
    x = torch.randn(3, k).to(torch.bfloat16)
    out = run_family(m80, x, qw, sc, zz, None, 4, False, group, "sub", torch.bfloat16, V2)
    want = m80.reference_prepared(x, qw, sc, zz, None, 4, group, V2)
    assert torch.equal(out, want)
    with pytest.raises(ValueError):
        run_family(m80, x, qw, sc, zz, None, 4, False, group, "sub", torch.bfloat16, "nk")
