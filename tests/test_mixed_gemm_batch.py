"""CPU tests of the small-batch kernel's planning (qcompile.kernels.mixed_gemm_batch): choice
names, what it takes, the heuristic, candidates, the libraries ``qcompile build`` makes, and
how the Hopper family offers it."""

from __future__ import annotations

import pytest

from qcompile.kernels import mixed_gemm as mg
from qcompile.kernels import mixed_gemm_batch as bat
from qcompile.kernels import mixed_gemm_decode as dec


def test_names_round_trip_and_bad_names():
    seen = set()
    for t in (16, 32, 64):
        for w in (4, 8):
            for r in (1, 2):
                for s in (1, 2, 4, 8):
                    c = bat.BatchChoice(t, 16 * w * r, w, s)
                    assert c.valid() and c.row_tiles == r
                    assert c.name == f"batch.t{t}.r{16 * w * r}.w{w}.s{s}"
                    assert c.name not in seen
                    seen.add(c.name)
                    assert bat.choice_from_name(c.name) == c == mg.choice_from_name(c.name)
    assert len(seen) == 48
    for bad in ("batch.", "batch.t64.r128.w8", "batch.t48.r128.w8.s1", "batch.t64.r96.w8.s1",
                "batch.t64.r128.w2.s1", "batch.t64.r512.w8.s1", "batch.t64.r128.w8.s3",
                "batch.t64.r128.w8.s16", "batch.r128.t64.w8.s1", "batch.t64.r128.w8.sx",
                "decode.t8.r16.w8"):
        with pytest.raises(ValueError, match="no small-batch-kernel choice"):
            bat.choice_from_name(bad)


def test_fits():
    gz, rs = dec.MODE_GROUPZERO, dec.MODE_ROWSCALE
    assert bat.fits(64, 4096, 4096, 128, gz) and bat.fits(1, 64, 64, 64, gz)
    assert not bat.fits(65, 4096, 4096, 128, gz)            # more tokens than a tile holds
    assert not bat.fits(0, 4096, 4096, 128, gz)
    assert not bat.fits(16, 4096, 4096, 32, gz)             # one group a 64-deep chunk
    assert not bat.fits(16, 4096, 3072, 192, gz)            # 3 chunks a group: no shift
    assert not bat.fits(16, 4104, 4096, 4096, rs)           # N in whole 64-row CTAs at least
    assert not bat.fits(16, 2**17, 2**15, 128, gz)          # byte offsets in 32 bits
    assert bat.fits(16, 4096, 4096, 4096, rs, bat.BatchChoice(16, 256, 8, 8))
    assert not bat.fits(16, 192, 4096, 4096, rs, bat.BatchChoice(16, 128, 8, 1))
    assert not bat.fits(16, 4096, 448, 448, rs, bat.BatchChoice(16, 128, 8, 8))  # 7 chunks
    assert bat.fits(16, 4096, 448, 448, rs, bat.BatchChoice(16, 128, 8, 1))


def test_heuristic_and_candidates():
    for m, tokens in ((9, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64)):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (6144, 4096)):
            h = bat.heuristic(m, n, k)
            assert h.valid() and h.tokens == tokens and n % h.rows == 0
            assert k % (64 * h.splits) == 0
            names = bat.candidates(m, n, k)
            assert names[0] == h.name and len(set(names)) == len(names)
            for name in names[1:]:
                c = bat.choice_from_name(name)
                assert c.tokens == tokens and n % c.rows == 0 and k % (64 * c.splits) == 0
                assert 66 <= (n // c.rows) * c.splits <= 4 * 132
    # the fewest splits that give every SM a CTA of 128 rows
    assert bat.heuristic(64, 4096, 4096) == bat.BatchChoice(64, 128, 8, 8)   # 32 x 8 = 256
    assert bat.heuristic(64, 14336, 4096) == bat.BatchChoice(64, 128, 8, 2)  # 112 x 2
    assert bat.heuristic(64, 64, 4096) == bat.BatchChoice(64, 64, 4, 8)
    assert bat.candidates(65, 4096, 4096) == []


def test_builds_are_data_for_qcompile_build():
    for b in dec.builds(dec.LAYOUT_SM90):
        spec = bat.kernel_spec(b)
        assert spec.source == "mixed_gemm_batch.cu" and spec.arch == "sm_90"
        assert spec.defines == b.defines()


def test_hopper_family_offers_it_between_decode_and_gemm():
    for layout, group in ((mg.LAYOUT_ROWSCALE, 4096), (mg.LAYOUT_GROUPZERO, 128)):
        for bits in (4, 8):
            for m, offered in ((1, False), (8, False), (9, True), (64, True), (65, False)):
                names = mg.candidates(m, 4096, 4096, "bf16", bits, group, layout, 132)
                assert any(bat.is_name(c) for c in names) == offered, (m, names)
    # not where a split would leave part of a group's 64-deep chunk (K = 4096 + 64 is 65
    # chunks: only one split, and the CTAs of 128 rows are too few to be worth timing)
    names = mg.candidates(32, 4096, 4160, "bf16", 4, 64, mg.LAYOUT_GROUPZERO, 132)
    assert [c for c in names if bat.is_name(c)] == [bat.heuristic(32, 4096, 4160).name]
