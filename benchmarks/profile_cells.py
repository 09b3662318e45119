"""Nsight Compute over one launch of each chosen cell's kernels: what limits a cell.

    python benchmarks/profile_cells.py [--cells issue25,issue27] [--ncu ncu]
        [--out benchmarks/results/profiles/ncu_cells.jsonl]

For each (cell, implementation) of the presets one ``ncu`` process runs this script's
``--child`` mode: the cell's weight and implementation built as ``bench_w4a16.py`` builds
them, one warm-up call (builds, library loads, Triton compilation), then one call inside the
NVTX range ``qc_profile``, the only launches ncu profiles. Every cache is flushed before each
kernel (``--cache-control all``) and the clocks are left alone (``--clock-control none``).
ncu's raw page (CSV, base units) is read back into one JSON line per kernel: its duration,
DRAM bytes and throughput, issue-slot use, occupancy, launch shape and register limit, the
pipes' utilisation and the stall cycles per issued instruction by reason (``stalls``). A
metric the sections did not give is listed in the row's ``missing``, never left out
silently. A profile, not a timing (the kernel benches time cells): rows go to
``results/profiles/`` and stay off docs/performance.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit  # noqa: E402

RANGE = "qc_profile"
OUT = Path(__file__).resolve().parent / "results" / "profiles" / "ncu_cells.jsonl"

# Cells: (pattern, act, n, k, m, implementations). The presets are the cells the issues'
# targets miss, each beside the peer or floor it is measured against.
PRESETS: dict[str, tuple[tuple[str, str, int, int, int, tuple[str, ...]], ...]] = {
    "issue25": (
        ("w4a16_g128_zp", "bf16", 14336, 4096, 1, ("qcompile", "read_floor")),
        ("w4a16_g128_zp", "bf16", 14336, 4096, 16, ("qcompile", "read_floor")),
        ("w4a16_g128_zp", "bf16", 4096, 4096, 1, ("qcompile", "read_floor")),
        ("w4a16_g128_zp", "bf16", 4096, 4096, 16, ("qcompile", "read_floor")),
        ("w4a16_g128_zp", "fp16", 14336, 4096, 16, ("qcompile", "marlin")),
        ("w4a16_g128_zp", "bf16", 4096, 4096, 64, ("qcompile", "cublas_bf16")),
        ("w4a16_g128_zp", "bf16", 4096, 4096, 256, ("qcompile", "cublas_bf16")),
        ("w8a16_pc", "bf16", 4096, 4096, 64, ("qcompile", "cublas_bf16")),
    ),
    "issue27": (
        ("nf4_b64", "bf16", 4096, 4096, 256, ("qcompile",)),
        ("w4a16_g128_zp", "bf16", 4096, 4096, 256, ("qcompile",)),
        ("nf4_b64", "bf16", 14336, 4096, 1, ("qcompile", "read_floor")),
    ),
}

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "ComputeWorkloadAnalysis")
EXTRA_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "smsp__inst_executed.sum")
NCU_ARGS = ("--csv", "--page", "raw", "--print-units", "base", "--cache-control", "all",
            "--clock-control", "none", "--nvtx", "--nvtx-include", f"{RANGE}/",
            *(f"--section={s}" for s in SECTIONS), "--metrics", ",".join(EXTRA_METRICS))

# row field: ncu metric (raw page, base units)
FIELDS = {
    "duration_ns": "gpu__time_duration.sum",
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_pct_of_peak": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "issue_active_pct": "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "theoretical_occupancy_pct": "sm__maximum_warps_per_active_cycle_pct",
    "registers": "launch__registers_per_thread",
    "grid": "launch__grid_size",
    "block": "launch__block_size",
    "ctas_per_sm_by_registers": "launch__occupancy_limit_registers",
    "warp_instructions": "smsp__inst_executed.sum",
}
PIPE = re.compile(r"^sm__(?:inst_executed_pipe_|pipe_)(\w+?)(?:_cycles_active)?"
                  r"\.avg\.pct_of_peak_sustained_active$")
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def cell_arg(cell: tuple, impl: str) -> str:
    """The --child argument of one cell's implementation: pattern:act:NxK:M:impl."""
    pattern, act, n, k, m, _ = cell
    return f"{pattern}:{act}:{n}x{k}:{m}:{impl}"


def parse_cell_arg(arg: str) -> tuple[str, str, int, int, int, str]:
    pattern, act, shape, m, impl = arg.split(":")
    n, k = shape.split("x")
    return pattern, act, int(n), int(k), int(m), impl


def ncu_command(ncu: str, cell: tuple, impl: str) -> list[str]:
    return [ncu, *NCU_ARGS, sys.executable, str(Path(__file__).resolve()), "--child",
            cell_arg(cell, impl)]


def parse_raw_csv(text: str) -> list[dict[str, str]]:
    """ncu's ``--csv --page raw`` output (the profiled program's own lines and ncu's
    ``==PROF==`` lines mixed in) -> one {column: value} per profiled kernel: the header is the
    quoted line naming "Kernel Name", the units line after it and any other line without a
    kernel ID are skipped."""
    rows, header = [], None
    for values in csv.reader(line for line in text.splitlines() if line.startswith('"')):
        if header is None:
            if "Kernel Name" in values:
                header = values
            continue
        if len(values) == len(header) and values[0].strip().isdigit():
            rows.append(dict(zip(header, values)))
    return rows


def _number(value: str) -> float | None:
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return None


def summarise(metrics: dict[str, str]) -> dict:
    """The row fields of one kernel's raw metrics; ``missing``: FIELDS the page lacked."""
    out: dict = {"kernel": metrics.get("Kernel Name", "")}
    missing = []
    for field, name in FIELDS.items():
        value = _number(metrics[name]) if name in metrics else None
        if value is None:
            missing.append(name)
        out[field] = value
    out["pipes_pct"] = {m.group(1): _number(v) for name, v in sorted(metrics.items())
                        if (m := PIPE.match(name)) and _number(v) is not None}
    out["stalls"] = {m.group(1): _number(v) for name, v in sorted(metrics.items())
                     if (m := STALL.match(name)) and _number(v) is not None}
    if not out["stalls"]:
        missing.append("smsp__average_warps_issue_stalled_*_per_issue_active.ratio")
    out["missing"] = missing
    return out


def child(arg: str) -> int:
    """Build one cell's implementation, warm it up, then call it once inside RANGE."""
    import bench_w4a16 as bw
    pattern, act_name, n, k, m, impl = parse_cell_arg(arg)
    act = bw.ACTS[act_name]
    torch.manual_seed(0)
    with torch.no_grad():
        fmt, w, mod = bw.make_weights(pattern, n, k, act)
        made = bw.build_impls(pattern, n, k, fmt, w, mod, [impl], act)
        if impl not in made:
            print(f"{arg}: {impl} could not be built here", file=sys.stderr)
            return 2
        fn = made[impl]
        x = torch.randn(m, k, device="cuda").to(act)
        fn(x)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(RANGE)
        fn(x)
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="issue25,issue27", help=f"presets: {', '.join(PRESETS)}")
    ap.add_argument("--ncu", default=shutil.which("ncu") or "ncu")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    presets = args.cells.split(",")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        ap.error(f"unknown presets {unknown}; known: {sorted(PRESETS)}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "unknown"
    meta = dict(bench="ncu_cells", device=device, torch=torch.__version__, commit=commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                flush="ncu --cache-control all",
                command=" ".join([Path(sys.executable).name, *sys.argv]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with args.out.open("a") as f:
        for cell in (c for p in presets for c in PRESETS[p]):
            pattern, act, n, k, m, impls = cell
            for impl in impls:
                proc = subprocess.run(ncu_command(args.ncu, cell, impl), capture_output=True,
                                      text=True)
                kernels = parse_raw_csv(proc.stdout)
                if proc.returncode != 0 or not kernels:
                    failed += 1
                    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
                    print(f"{cell_arg(cell, impl)}: no profile (rc {proc.returncode})\n{tail}")
                    continue
                for metrics in kernels:
                    row = {**meta, "pattern": pattern, "act": act, "n": n, "k": k, "m": m,
                           "impl": impl, **summarise(metrics)}
                    f.write(json.dumps(row) + "\n")
                    print(f"{cell_arg(cell, impl)}: {row['kernel'][:60]} {row['duration_ns']} ns, "
                          f"DRAM {row['dram_pct_of_peak']}%, issue {row['issue_active_pct']}%"
                          + (f", missing {row['missing']}" if row["missing"] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
