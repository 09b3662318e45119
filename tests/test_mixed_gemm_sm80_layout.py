"""CPU tests of the sm80 mixed-GEMM family's weight preparation and heuristic
(qcompile.kernels.mixed_gemm_sm80): prepare/unprepare round trips for every shape class,
the byte layout the kernel reads (hand-computed cases), the scale/zero folding against the
reference op, and the configs. Nothing here needs a GPU or nvcc.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from qcompile.kernels import mixed_gemm_sm80 as m80
from qcompile.kernels import ops


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
        # pipeline smem (bf16 x tile + int8 w tile per stage) within sm_86/89's 99 KiB
        assert c.stages * (tm * tk * 2 + tn * tk) <= 99 * 1024
        assert c.defines()["QC_ACT_FP16"] == int(c.act == "fp16")
    assert {c.tile[0] for c in m80.CONFIGS} >= {16, 32}  # small-M tiles


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
    paths = {c: cached_path(m80._spec(c)) for c in m80.CONFIGS}
    if all(p is None for p in paths.values()):
        pytest.skip("kernel libraries not built")
    for cfg, path in paths.items():
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            pytest.skip(f"cannot load {path.name}: {e}")
        info = (ctypes.c_int * 8)()
        assert lib.qc_mixed_gemm_sm80_info(info, 8) == 8
        assert list(info) == cfg.info(), m80.config_name(cfg)
