"""benchmarks/profile_cells.py on CPU: ncu's raw CSV read back into rows (the program's own
lines and ncu's mixed in), the presets naming only what bench_w4a16 builds, and the driver
end to end against a stand-in ncu that prints a canned page."""

from __future__ import annotations

import json
import stat

import bench_w4a16
import profile_cells as pc
import pytest

HEADER = ['ID', 'Process ID', 'Kernel Name', 'gpu__time_duration.sum', 'dram__bytes_read.sum',
          'gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed',
          'sm__inst_issued.avg.pct_of_peak_sustained_active',
          'sm__warps_active.avg.pct_of_peak_sustained_active', 'sm__maximum_warps_per_active_cycle_pct',
          'launch__registers_per_thread', 'launch__grid_size', 'launch__block_size',
          'launch__occupancy_limit_registers', 'smsp__inst_executed.sum',
          'sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active',
          'sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active',
          'smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio',
          'smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio']
UNITS = ['', '', '', 'nsecond', 'byte', '%', '%', '%', '%', 'register/thread', '', '', 'block',
         'inst', '%', '%', 'ratio', 'ratio']
KERNELS = [['0', '4242', 'mixed_gemm_decode_kernel<1, 2, 0, 1>', '17408', '31,224,576', '55.5',
            '42.68', '40.07', '50', '62', '448', '256', '4', '5,546,240', '15.55', '41.12', '7.31',
            '0.79'],
           ['1', '4242', 'read_floor_kernel', '12500', '30,408,704', '72.1', '10.2', '60.3', '100',
            '32', '1056', '128', '16', '1,200,000', '0', '5.5', '9.9', '0']]


def _page(with_noise: bool = True) -> str:
    lines = ["==PROF== Connected to process 4242", "compiling 1/1: a kernel"] if with_noise else []
    lines += [",".join(f'"{v}"' for v in row) for row in (HEADER, UNITS, *KERNELS)]
    if with_noise:
        lines.append("==PROF== Disconnected from process 4242")
    return "\n".join(lines) + "\n"


def test_raw_page_read_back():
    rows = pc.parse_raw_csv(_page())
    assert [r["Kernel Name"] for r in rows] == ["mixed_gemm_decode_kernel<1, 2, 0, 1>", "read_floor_kernel"]
    s = pc.summarise(rows[0])
    assert s["duration_ns"] == 17408 and s["dram_read_bytes"] == 31224576  # thousands separators
    assert (s["dram_pct_of_peak"], s["issue_active_pct"], s["registers"]) == (55.5, 42.68, 62)
    assert s["ctas_per_sm_by_registers"] == 4 and s["warp_instructions"] == 5546240
    assert s["pipes_pct"] == {"alu": 41.12, "tensor_op_hmma": 15.55}
    assert s["stalls"] == {"barrier": 0.79, "long_scoreboard": 7.31}
    assert s["missing"] == []


def test_missing_metrics_are_named():
    rows = pc.parse_raw_csv(_page())
    del rows[1]["launch__registers_per_thread"]
    rows[1] = {k: v for k, v in rows[1].items() if "stalled" not in k}
    s = pc.summarise(rows[1])
    assert s["registers"] is None
    assert s["missing"] == ["launch__registers_per_thread",
                            "smsp__average_warps_issue_stalled_*_per_issue_active.ratio"]
    assert pc.parse_raw_csv("==PROF== no kernels profiled\n") == []


def test_presets_name_what_the_bench_builds():
    for cells in pc.PRESETS.values():
        for cell in cells:
            pattern, act, n, k, m, impls = cell
            assert pattern in bench_w4a16.PATTERNS and act in bench_w4a16.ACTS
            assert set(impls) <= set(bench_w4a16.IMPLS) and m >= 1
            for impl in impls:
                assert pc.parse_cell_arg(pc.cell_arg(cell, impl)) == (pattern, act, n, k, m, impl)
    cmd = pc.ncu_command("ncu", pc.PRESETS["issue25"][0], "qcompile")
    assert cmd[0] == "ncu" and "--cache-control" in cmd and cmd[cmd.index("--cache-control") + 1] == "all"
    assert cmd[cmd.index("--nvtx-include") + 1] == f"{pc.RANGE}/"
    assert cmd[-2:] == ["--child", "w4a16_g128_zp:bf16:14336x4096:1:qcompile"]


def test_driver_writes_a_row_per_kernel(tmp_path):
    page = tmp_path / "page.csv"
    page.write_text(_page())
    fake = tmp_path / "ncu"
    fake.write_text(f"#!/bin/sh\ncat {page}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "rows.jsonl"
    assert pc.main(["--cells", "issue27", "--ncu", str(fake), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    calls = sum(len(c[5]) for c in pc.PRESETS["issue27"])
    assert len(rows) == 2 * calls  # two kernels on the canned page, every call
    assert {r["bench"] for r in rows} == {"ncu_cells"}
    assert all(r["flush"] == "ncu --cache-control all" and r["commit"] and r["date"] for r in rows)
    assert rows[0]["pattern"] == "nf4_b64" and rows[0]["m"] == 256 and rows[0]["impl"] == "qcompile"
    assert rows[0]["stalls"]["long_scoreboard"] == 7.31


def test_driver_fails_when_ncu_gives_nothing(tmp_path):
    fake = tmp_path / "ncu"
    fake.write_text("#!/bin/sh\necho '==ERROR== Failed to find metric' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "rows.jsonl"
    assert pc.main(["--cells", "issue27", "--ncu", str(fake), "--out", str(out)]) == 1
    assert out.read_text() == ""
    with pytest.raises(SystemExit):
        pc.main(["--cells", "issue99", "--ncu", str(fake), "--out", str(out)])

