"""Kernel selection on CPU: dispatch tables, the autotuner's choice logic (with a fake
timer), choice names of every family, and which family a device capability selects."""

from __future__ import annotations

import pytest
import torch

from qcompile import kernels
from qcompile.kernels import int8_gemm, mixed_gemm, tuning


def test_table_round_trip_and_merging():
    rows = [(1, 1, "a"), (2, 16, "b"), (17, 64, "b"), (65, None, "c")]
    config = tuning.format_table(rows)
    assert config == "1-1:a,2-64:b,65-:c"
    assert tuning.parse_table(config) == ((1, 1, "a"), (2, 64, "b"), (65, None, "c"))
    assert [tuning.lookup(config, m) for m in (1, 2, 64, 65, 10**6)] == ["a", "b", "b", "c", "c"]
    # one choice for every M is just its name; "" is the heuristic
    assert tuning.format_table([(1, 16, "x"), (17, None, "x")]) == "x"
    assert tuning.lookup("x", 12345) == "x"
    assert tuning.lookup("", 3) is None
    # a table with a gap leaves the gap to the heuristic
    assert tuning.lookup("1-1:a,17-:c", 5) is None


@pytest.mark.parametrize("bad", ["1:a", "a-3:b", "1-2:", "1-x:a", "1-2:a,3"])
def test_malformed_table_is_an_error(bad):
    with pytest.raises(ValueError, match="bad kernel config"):
        tuning.parse_table(bad)


def test_autotune_keeps_the_fastest_per_bucket(monkeypatch):
    # Fake clock: "small" wins up to M=64, "big" beyond; "broken" always raises.
    def fake_time(fn):
        return fn()

    def run(choice, x):
        m = x.shape[0]
        if choice == "broken":
            raise RuntimeError("cannot run")
        return {"small": 1.0 if m <= 64 else 9.0, "big": 5.0 if m <= 64 else 2.0}[choice]

    monkeypatch.setattr(tuning._compat, "benchmark_gpu", fake_time)
    tuned = tuning.autotune(run, lambda m: ["broken", "small", "big"], lambda m: torch.empty(m, 8),
                            None, "test")
    assert tuned.config == "1-64:small,65-:big"
    assert [b[2] for b in tuning.BUCKETS] == list(tuned.timings)
    assert tuned.timings[1][0] == ("small", 1000.0)  # ms -> us
    assert all("broken" not in dict(t) for t in tuned.timings.values())
    # a static M tunes that M only
    tuned = tuning.autotune(run, lambda m: ["small", "big"], lambda m: torch.empty(m, 8), 300, "t")
    assert tuned.config == "big" and list(tuned.timings) == [300]
    # nothing runs: no table, the heuristic stays
    assert tuning.autotune(run, lambda m: ["broken"], lambda m: torch.empty(m, 8), 4, "t").config == ""
    # token counts up to heuristic_max_m (the decode kernel's) are neither timed nor tabled
    tuned = tuning.autotune(run, lambda m: ["small", "big"], lambda m: torch.empty(m, 8), None,
                            "t", heuristic_max_m=8)
    assert tuned.config == "9-64:small,65-:big" and 1 not in tuned.timings
    assert tuning.lookup(tuned.config, 8) is None and tuning.lookup(tuned.config, 9) == "small"
    timed = []
    tuned = tuning.autotune(lambda c, x: timed.append(c) or run(c, x), lambda m: ["small"],
                            lambda m: torch.empty(m, 8), 4, "t", heuristic_max_m=8)
    assert tuned.config == "" and not tuned.timings and not timed


def test_pick_family_by_relative_time():
    fast_decode = tuning.Tuned("a", {1: [("a", 10.0)], 4096: [("a", 400.0)]})
    fast_prefill = tuning.Tuned("b", {1: [("b", 20.0)], 4096: [("b", 380.0)]})
    # 10/10 + 400/380 = 2.05 beats 20/10 + 380/380 = 3.0: decode is not drowned by prefill
    assert kernels._pick({"sm90": fast_decode, "sm80": fast_prefill}) == "sm90"
    assert kernels._pick({}) is None


@pytest.mark.parametrize("layout", mixed_gemm.LAYOUTS)
@pytest.mark.parametrize("m", [1, 16, 64, 256, 4096])
def test_sm90_mixed_choice_names_round_trip(layout, m):
    bits = 8 if layout == mixed_gemm.LAYOUT_ROWSCALE else 4
    names = mixed_gemm.candidates(m, 14336, 4096, "bf16", bits, 128, layout, 132)
    assert names and len(names) == len(set(names))
    assert len([n for n in names if not n.startswith("decode.")]) <= 16
    heuristic = mixed_gemm.heuristic_choice(m, 14336, 4096, "bf16", bits,
                                            mixed_gemm._MODE_OF_LAYOUT[layout], 132,
                                            None if layout == mixed_gemm.LAYOUT_ROWSCALE else 128)
    assert names[0] == mixed_gemm.choice_name(heuristic)
    for name in names:
        assert mixed_gemm.choice_name(mixed_gemm.choice_from_name(name)) == name


@pytest.mark.parametrize("bad", ["nope", "bf16.w4.gz.128x64x64.coop.sk/sk1",
                                 "bf16.w4.gz.128x64x64.coop.sk/zz", "bf16.w4.gz.128x128x64.coop/sk2"])
def test_sm90_mixed_bad_choice_name(bad):
    with pytest.raises(ValueError, match="no sm90 mixed-GEMM choice"):
        mixed_gemm.choice_from_name(bad)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("m", [1, 64, 256, 4096])
def test_int8_choice_names_round_trip(arch, m):
    names = int8_gemm.candidates(m, 4096, 4096, torch.bfloat16, arch)
    assert names[0] == int8_gemm._name(int8_gemm.heuristic_choice(m, 4096, 4096,
                                                                  torch.bfloat16, arch))
    # the decode kernel's launch shapes (m <= 32; tests/test_mixed_gemm_decode.py) aside
    names = [name for name in names if not name.startswith("decode.")]
    assert names and (m > 32 or len(names) < len(int8_gemm.candidates(m, 4096, 4096,
                                                                       torch.bfloat16, arch)))
    for name in names:
        cfg = int8_gemm.choice_from_name(name)
        assert int8_gemm.config_name(cfg) == name
        assert cfg.arch == arch or (cfg.arch == "sm_80" and arch == "sm_90a")
    with pytest.raises(ValueError, match="no int8 GEMM config"):
        int8_gemm.choice_from_name("sm90_128x256_c2_s4")  # not a stream-K build


@pytest.mark.parametrize("m,n,name", [(64, 4096, "sm90_swap_64x16x256_pp"),
                                      (128, 4096, "sm90_swap_128x32_sk"),
                                      (129, 4096, "sm90_swap_128x64_sk"),
                                      (128, 14336, "sm90_128x256_c2"),
                                      (2048, 4096, "sm90_128x256_c2")])
def test_int8_heuristic_tiles(m, n, name):
    """The sm90 int8 heuristic by token count and width (measured picks, int8_gemm.py)."""
    assert int8_gemm.choose_config(m, n, 4096, torch.bfloat16, "sm_90a").name == name


@pytest.mark.parametrize("cap,families", [((9, 0), ["mixed_gemm", "mixed_gemm_sm80"]),
                                          ((8, 0), ["mixed_gemm_sm80"]),
                                          ((8, 9), ["mixed_gemm_sm80"]),
                                          ((7, 5), []), ((10, 0), [])])
def test_mixed_families_by_capability(monkeypatch, cap, families):
    monkeypatch.setattr(kernels, "device_capability", lambda device: cap)
    assert kernels.mixed_families(torch.device("cuda", 0)) == families
    assert kernels.mixed_families(torch.device("cpu")) == []
