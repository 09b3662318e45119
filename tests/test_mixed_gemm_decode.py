"""CPU tests of the decode kernel's planning (qcompile.kernels.mixed_gemm_decode): choice
names, the heuristic, candidates, what it takes, the libraries ``qcompile build`` makes,
and how both mixed families offer it."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import mixed_gemm as mg
from qcompile.kernels import mixed_gemm_decode as dec
from qcompile.kernels import mixed_gemm_sm80 as m80


def test_names_round_trip_and_bad_names():
    seen = set()
    for t in (8, 16, 32):
        for r in (16, 32, 64):
            for w in (1, 4, 8, 16):
                c = dec.DecodeChoice(t, r, w)
                if not c.valid():
                    # the reduction buffer limits, and 64-row CTAs take at most 16 tokens
                    assert c.smem_bytes() > 48 * 1024 or (r, t) == (64, 32)
                    continue
                assert c.name == f"decode.t{t}.r{r}.w{w}" and c.name not in seen
                seen.add(c.name)
                assert dec.choice_from_name(c.name) == c
                # both families hand decode names to this module
                assert mg.choice_from_name(c.name) == c == m80.choice_from_name(c.name)
    for bad in ("decode.", "decode.t8.r16", "decode.t12.r16.w8", "decode.t8.r48.w8",
                "decode.t8.r16.w0", "decode.t8.r16.w17", "decode.r16.t8.w8", "decode.t8.r16.wx",
                "decode.t32.r32.w16", "decode.t32.r64.w4", "decode.t16.r64.w16",
                "bf16.w4.gz.128x16x64.coop.sk/sk4"):
        with pytest.raises(ValueError, match="no decode-kernel choice"):
            dec.choice_from_name(bad)


def test_fits():
    assert dec.fits(1, 4096, 4096, 128, dec.MODE_GROUPZERO)
    assert dec.fits(32, 16, 64, 64, dec.MODE_GROUPZERO)
    assert not dec.fits(33, 4096, 4096, 128, dec.MODE_GROUPZERO)   # more tokens than it takes
    assert not dec.fits(0, 4096, 4096, 128, dec.MODE_GROUPZERO)
    assert not dec.fits(1, 4096, 4096, 32, dec.MODE_GROUPZERO)     # one group per 64-k chunk
    assert not dec.fits(1, 4096, 4096 + 32, 4096 + 32, dec.MODE_ROWSCALE)
    assert not dec.fits(1, 4104, 4096, 128, dec.MODE_GROUPZERO)    # N in 16-row tiles
    assert dec.fits(1, 4096, 4096, 4096, dec.MODE_ROWSCALE)
    assert dec.fits(1, 4096, 4096, 256, dec.MODE_GROUPZERO)
    assert not dec.fits(1, 4096, 3072, 192, dec.MODE_GROUPZERO)    # 3 chunks a group: no shift
    assert not dec.fits(1, 2**17, 2**15, 128, dec.MODE_GROUPZERO)  # byte offsets in 32 bits
    assert dec.fits(1, 48, 64, 64, dec.MODE_GROUPZERO, dec.DecodeChoice(8, 16, 4))
    assert not dec.fits(1, 48, 64, 64, dec.MODE_GROUPZERO, dec.DecodeChoice(8, 32, 4))


def test_heuristic_and_candidates():
    for m, tokens in ((1, 8), (8, 8), (9, 16), (16, 16), (17, 32), (32, 32)):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (16, 64)):
            h = dec.heuristic(m, n, k)
            assert h.valid() and h.tokens == tokens and h.rows == (32 if n >= 4096 else 16)
            assert 4 <= h.warps <= 16
            names = dec.candidates(m, n, k)
            assert names[0] == h.name and len(set(names)) == len(names)
            for name in names:
                c = dec.choice_from_name(name)
                assert c.tokens == tokens and n % c.rows == 0
    # 16 warps a CTA while the CTAs fit one to an SM, else 8
    assert dec.heuristic(1, 14336, 4096) == dec.DecodeChoice(8, 32, 8)  # 448 CTAs > 132 SMs
    assert dec.heuristic(1, 14336, 4096, sm_count=448) == dec.DecodeChoice(8, 32, 16)
    assert dec.heuristic(1, 4096, 4096) == dec.DecodeChoice(8, 32, 16)
    assert dec.heuristic(32, 4096, 4096) == dec.DecodeChoice(32, 32, 8)  # 48 KB reduction
    assert dec.heuristic(1, 48, 64) == dec.DecodeChoice(8, 16, 16)
    assert dec.heuristic(1, 1024, 4096) == dec.DecodeChoice(8, 16, 16)  # 64 CTAs, not 32
    assert dec.candidates(33, 4096, 4096) == []
    # 64-row CTAs are offered up to 16 tokens where they divide N, never picked unmeasured
    assert "decode.t16.r64.w8" in dec.candidates(16, 14336, 4096)
    assert "decode.t8.r64.w4" in dec.candidates(1, 14336, 4096)
    assert not any(".r64." in c for c in dec.candidates(17, 14336, 4096) + dec.candidates(1, 48, 64))


def test_staged_scales_choice():
    """``.sz`` launches (scales and zeros staged in shared memory): names, where they fit, and
    the heuristic taking them for group-wise weights whose CTAs make four waves or more."""
    c = dec.DecodeChoice(8, 32, 4, sz_smem=True)
    assert c.name == "decode.t8.r32.w4.sz" and dec.choice_from_name(c.name) == c
    assert mg.choice_from_name(c.name) == c
    for bad in ("decode.t8.r32.w4.zz", "decode.t8.r32.w4.sz.sz"):
        with pytest.raises(ValueError, match="no decode-kernel choice"):
            dec.choice_from_name(bad)
    # their region: the reduction's tiles or the staged words, whichever is larger
    assert c.smem_bytes() == 4 * 2 * 512
    assert c.smem_bytes(4096, 128) == 32 * 2 * 64 == 4096
    assert c.smem_bytes(4096, 64) == 8192
    assert dec.DecodeChoice(8, 32, 4).smem_bytes(4096, 64) == 4096  # not staged: unchanged
    assert dec.fits(1, 28672, 4096, 128, dec.MODE_GROUPZERO, c)
    assert not dec.fits(1, 28672, 4096, 4096, dec.MODE_ROWSCALE, c)  # per-channel: no groups
    assert not dec.fits(1, 4096, 65536, 64, dec.MODE_GROUPZERO, c)   # 64 KB of staged words
    # the norm a fused op stages comes on top
    assert c.takes_norm(4, 4096) and c.takes(4, 4096, staged=True, group=128)
    assert not c.takes(8, 4096, staged=True, group=64)  # 8 KB + 64 KB of x * norm
    # the heuristic: 28672 rows are 896 32-row CTAs, 6.8 waves on 132 SMs: 4-warp CTAs
    assert dec.heuristic(1, 28672, 4096, group=128) == c
    assert dec.heuristic(8, 28672, 4096, group=64) == c
    assert dec.heuristic(1, 28672, 4096) == dec.DecodeChoice(8, 32, 8)           # per-channel
    assert dec.heuristic(9, 28672, 4096, group=128) == dec.DecodeChoice(16, 32, 8)
    # 14336 rows, 3.4 waves: 8-warp CTAs; 6144 rows, 1.5 waves: not staged
    assert dec.heuristic(1, 14336, 4096, group=128) == dec.DecodeChoice(8, 32, 8, sz_smem=True)
    assert dec.heuristic(1, 6144, 4096, group=128) == dec.DecodeChoice(8, 32, 8)
    assert dec.heuristic(1, 4096, 4096, group=128) == dec.DecodeChoice(8, 32, 16)
    # larger than the 8-warp reduction's 8 KB (K = 16384 in groups of 64): not taken
    assert dec.heuristic(1, 28672, 16384, group=64) == dec.DecodeChoice(8, 32, 8)
    # candidates: both forms for group-wise weights, none staged otherwise
    names = dec.candidates(1, 4096, 4096, group=128)
    assert "decode.t8.r32.w8.sz" in names and "decode.t8.r32.w8" in names
    assert not any(n.endswith(".sz") for n in dec.candidates(1, 4096, 4096))
    assert not any(n.endswith(".sz") for n in dec.candidates(16, 4096, 4096, group=128))
    # the Hopper family passes the group of group-wise layouts only
    assert mg.heuristic_choice(1, 28672, 4096, "bf16", 4, 2, 132, 128) == c
    assert mg.heuristic_choice(1, 28672, 4096, "bf16", 8, 0, 132, None) == \
        dec.DecodeChoice(8, 32, 8)


def test_builds_are_data_for_qcompile_build():
    sm90 = dec.builds(dec.LAYOUT_SM90)
    v2 = dec.builds(dec.LAYOUT_SM80_V2)
    assert len(sm90) == 8 and len(v2) == 4  # act x bits (x rowscale / groupzero for sm90)
    assert all(b.mode == dec.MODE_GROUPZERO for b in v2)
    for b in sm90 + v2:
        spec = dec.kernel_spec(b)
        assert spec.source == "mixed_gemm_decode.cu" and spec.arch == "sm_80"
        assert spec.defines == {"QC_ACT_FP16": int(b.act == "fp16"), "QC_WBITS": b.bits,
                                "QC_LAYOUT": b.layout, "QC_MODE": b.mode}
        assert b.info() == list(spec.defines[k] for k in
                                ("QC_ACT_FP16", "QC_WBITS", "QC_LAYOUT", "QC_MODE"))


def test_families_offer_it_where_it_reads_the_layout():
    # Hopper: both layouts (rowscale and groupzero); sm80: the v2 group-wise layout only
    for layout, group in ((mg.LAYOUT_ROWSCALE, 4096), (mg.LAYOUT_GROUPZERO, 128)):
        for bits in (4, 8):
            names = mg.candidates(1, 4096, 4096, "bf16", bits, group, layout, 132)
            assert any(dec.is_name(c) for c in names)
            assert not any(dec.is_name(c) for c in
                           mg.candidates(64, 4096, 4096, "bf16", bits, group, layout, 132))
    assert any(dec.is_name(c) for c in
               m80.candidates(1, 4096, 4096, "bf16", 4, 128, m80.LAYOUT_GROUPZERO_V2, 132))
    assert not any(dec.is_name(c) for c in
                   m80.candidates(1, 4096, 4096, "bf16", 8, 4096, m80.LAYOUT_ROWSCALE, 132))


def test_heuristic_threshold(monkeypatch):
    # below DECODE_MAX_M the heuristic (and so the report and the run-time default) is the
    # decode kernel where it takes the format, a CUTLASS config otherwise
    assert mg.heuristic_choice(8, 14336, 4096, "bf16", 4, 2, 132, 128) == \
        dec.heuristic(8, 14336, 4096, group=128)
    # to 16 tokens where N gives at most a 32-row CTA per SM, and for int8 weights
    assert mg.heuristic_choice(16, 4096, 4096, "bf16", 4, 2, 132, 128) == dec.heuristic(16, 4096, 4096)
    assert mg.heuristic_choice(16, 14336, 4096, "bf16", 8, 0, 132, None) == \
        dec.heuristic(16, 14336, 4096)
    assert isinstance(mg.heuristic_choice(16, 14336, 4096, "bf16", 4, 2, 132, 128), mg.Choice)
    assert isinstance(mg.heuristic_choice(9, 14336, 4096, "bf16", 4, 2, 132, 128), mg.Choice)
    assert isinstance(mg.heuristic_choice(17, 4096, 4096, "bf16", 4, 2, 132, 128), mg.Choice)
    monkeypatch.setattr(mg, "DECODE_WIDE_MAX_M", 8)
    assert isinstance(mg.heuristic_choice(16, 4096, 4096, "bf16", 4, 2, 132, 128), mg.Choice)
    assert mg.heuristic_choice(1, 4096, 4096, "bf16", 8, 0, 132, None) == dec.heuristic(1, 4096, 4096)
    monkeypatch.setattr(m80, "DECODE_MAX_M", 16)
    assert m80.heuristic_choice(1, 4096, 4096, "bf16", 132, 4, "gz", 128) == dec.heuristic(1, 4096, 4096)
    assert isinstance(m80.heuristic_choice(1, 4096, 4096, "bf16", 132, 4, "gz", 32), m80.Choice)
    assert isinstance(m80.heuristic_choice(1, 4096, 4096, "bf16", 132, 8, "rs", 4096), m80.Choice)
    line = m80.describe(m80.LAYOUT_GROUPZERO_V2, 1, 4096, 4096, torch.bfloat16, "cpu", 4, 128)
    assert "decode.t8.r32" in line


def test_int8_family_offers_the_int8_decode_kernel(monkeypatch):
    from qcompile.kernels import int8_gemm as ig
    for arch in ("sm_90a", "sm_80"):
        names = ig.candidates(1, 4096, 4096, torch.bfloat16, arch)
        assert names[0] == dec.heuristic(1, 4096, 4096).name  # DECODE_MAX_M = 8
        decode_names = [c for c in names if dec.is_name(c)]
        assert decode_names == dec.candidates(1, 4096, 4096)
        assert all(ig.choice_from_name(c) == dec.choice_from_name(c) for c in decode_names)
        assert not any(dec.is_name(c) for c in ig.candidates(33, 4096, 4096, torch.bfloat16, arch))
        assert not any(dec.is_name(c) for c in ig.candidates(1, 4096, 4096 + 32, torch.bfloat16, arch))
        # beyond the threshold, and with it at 0, the CUTLASS configs as before
        assert ig.heuristic_choice(9, 4096, 4096, torch.bfloat16, arch) == \
            ig.choose_config(9, 4096, 4096, torch.bfloat16, arch)
        monkeypatch.setattr(ig, "DECODE_MAX_M", 0)
        assert ig.heuristic_choice(1, 4096, 4096, torch.bfloat16, arch) == \
            ig.choose_config(1, 4096, 4096, torch.bfloat16, arch)
        monkeypatch.undo()
    spec = ig.decode_spec(torch.float16)
    assert (spec.source, spec.arch, dict(spec.defines)) == ("int8_gemm_decode.cu", "sm_80",
                                                            {"QC_OUT_BF16": 0})
    assert ig.decode_fits(32, 48, 64) and not ig.decode_fits(32, 48, 64, dec.DecodeChoice(8, 32, 4))
    assert not ig.decode_fits(0, 48, 64) and not ig.decode_fits(1, 40, 64)


def test_takes_norm_where_shared_memory_holds_the_staged_tokens():
    """A launch with an RMSNorm also keeps each warp's sums of squares (4 bytes a token) and
    x * norm of the CTA's tokens (min(tile, M) x K in the activation type) in shared memory:
    past 48 KB the norm runs outside the kernel. The heuristic's launches for a Llama-3-8B
    decode step take it up to 4 tokens at K = 4096 (8-warp CTAs), none at 8."""
    for t in (8, 16, 32):
        for r in (16, 32):
            for w in range(1, 17):
                c = dec.DecodeChoice(t, r, w)
                for m, k in ((1, 4096), (3, 4096), (8, 1024), (32, 256)):
                    staged = w * t * 4 + min(t, m) * k * 2
                    assert c.takes_norm(m, k) == (c.smem_bytes() + staged <= 48 * 1024), c.name
                    # an epilogue that writes the next norm's input: the sums' region and the
                    # squares of the CTA's results, [rows][tokens] floats; never with a norm
                    # read (that kernel reads none)
                    out = w * t * 4 + r * t * 4
                    assert c.takes(m, k, norm_out=True) == (
                        c.smem_bytes() + out <= 48 * 1024), c.name
                    assert not c.takes(m, k, given=True, norm_out=True)
    assert dec.DecodeChoice(8, 32, 8).takes_norm(4, 4096)
    assert not dec.DecodeChoice(8, 32, 16).takes_norm(4, 4096)  # 16 KB of tiles + 32 KB
    # float32 activations stage 4 bytes a value
    assert dec.DecodeChoice(8, 32, 8).takes_norm(2, 4096, 4)
    assert not dec.DecodeChoice(8, 32, 8).takes_norm(3, 4096, 4)
    for n in (6144, 28672, 128256):
        for m in range(1, 5):
            assert dec.heuristic(m, n, 4096).takes_norm(m, 4096), (m, n)
        assert not dec.heuristic(8, n, 4096).takes_norm(8, 4096), n
