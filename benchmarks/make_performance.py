"""Write docs/performance.md and the README's performance table from benchmarks/results/*.jsonl.

    python benchmarks/make_performance.py            # regenerate both
    python benchmarks/make_performance.py --check    # exit 1 if either is stale

Every number on those pages comes from a results row; ratios are computed here, never typed.
The rules (also printed on the page):

- A row's *value* is ``tokens_per_s`` where it has one, else ``median_us``; rows with neither
  (or with an ``error``) are counted, not shown.
- A row's *cell* is everything that says what was measured: its bench, device, the grid
  fields (pattern, act, flush, model, settings, ...), the row fields (n, k, m, batch, ...) and
  the column (format and impl). Fields that describe a result rather than choose what was
  measured (provenance, ``config`` picked, errors, memory, ...) are not part of it.
- A cell shows its latest measurement: the row appended last to its file, and with it every
  row of the same run (same commit, date and command: interleaved rounds), whose median is
  shown.
- Kernel rows without ``flush`` were timed with do_bench's zero-fill flush and are labelled so.
- Decode rows whose timed loop still waited for the GPU every token are a grid of their own
  (``loop host-synced``), never the latest value of a current cell.
- An A/B's rows (with ``variant``) are columns ``<variant>: <impl>`` of one grid, with the
  baseline variant's time over each other variant's (``base`` or ``main``).
- A field this script does not know becomes a grid field (shown in the grid's heading), so a
  new file or field is shown, never dropped or merged with other cells.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"

VALUE_FIELDS = ("tokens_per_s", "median_us")
PROVENANCE = {"device", "torch", "commit", "date", "command"}
# Fields that describe a measurement (its result, what was picked, how it went), not which one.
DESCRIPTIVE = {
    "note", "round", "error", "rel_err_vs_bf16", "decomposition", "splits",
    "tb_per_s", "ms_per_token", "peak_mem_gb", "weight_gb", "kv_cache_gb", "compile_s",
    "matched", "released_gb", "baseline_gb", "ops", "matmuls", "quantized_linears",
    "all_taken_over", "graphs", "check_rel_err", "warmup", "fused",
    # what was left to Inductor (and why); what a peer ran on (Marlin's symmetric stand-in,
    # bitsandbytes' own absmax)
    "not_taken_over", "weights",
}
COLUMN_FIELDS = ("format", "impl")
# An A/B's builds of one kernel (rows with "variant"): a column each, "<variant>: <impl>", beside
# the baseline's (the first of VARIANT_BASES present), with baseline time / variant time.
VARIANT_BASES = ("base", "main")
ROW_FIELDS = ("n", "k", "m", "seq", "mb", "batch")
# Setting values that mean "the library's default": such a field is left out of the grid key.
DEFAULT_VALUES = {"default", None}
DEFAULT_SETTINGS = {"autotune": {False}, "fuse_linears": {True}, "decode_max_m": {8}}
# Benches timed by bench_common.time_graph (do_bench): rows without "flush" used its zero fill.
DO_BENCH = {"bench_w4a16", "w8a8", "bench_stream", "l2_probe", "tma_probe"}
# Peers whose ratio to qcompile a kernel grid shows (peer time / qcompile time: > 1 is faster).
PEERS = ("cublas_bf16", "marlin", "bitsandbytes", "tinygemm", "inductor_max_autotune",
         "inductor", "sdpa_default")
FLOOR = "read_floor"
BASELINE = "bf16 inductor"  # the decode column every other column is divided by
# Decode rows measured before the timed loop stopped waiting for the GPU every token (a
# host-to-device copy of each step's position; ~100-130 us a token of host time in every cell,
# bf16 included). The commits of bench_decode.jsonl that do not descend from that fix
# (`git merge-base --is-ancestor`); their rows are a grid of their own.
HOST_SYNCED_LOOP = {
    "1a25eab", "14d2286", "4ac22bf", "7194061", "3d4f97d", "45c81ec", "da55868", "9b5f759",
    "026fce3", "ea75c2d", "1a555a0", "96d8e93", "0438d48", "78ecd6d", "20deaea",
    "20deaea-olddecode", "db5afc8", "68369f1", "c3ee0b1", "4fda484", "b1df05b", "94e6b43",
}
PRETTY_MODEL = {"qcompile.llama": "the project's Llama (benchmarks/llama_model.py)"}


def load(results: Path = RESULTS) -> list[dict]:
    """Every row of every results file, with its file and line order."""
    rows = []
    for f in sorted(results.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                r["_file"], r["_line"] = f.name, i
                rows.append(r)
    return rows


def _hashable(v):
    return v if isinstance(v, (str, int, bool, type(None))) else json.dumps(v, sort_keys=True)


def _value_field(r: dict) -> str | None:
    return next((f for f in VALUE_FIELDS if isinstance(r.get(f), (int, float))), None)


def classify(r: dict) -> tuple[tuple, tuple, str] | None:
    """(grid key, row key, column) of a row, or None where it has no value."""
    vf = _value_field(r)
    if vf is None or r.get("error"):
        return None
    bench = str(r.get("bench", r["_file"].removesuffix(".jsonl")))
    grid = {"bench": bench, "device": r.get("device", "?"), "value": vf}
    if vf == "median_us" and bench in DO_BENCH and "flush" not in r:
        grid["flush"] = "zero"
    if bench == "decode" and r.get("commit") in HOST_SYNCED_LOOP:
        grid["loop"] = "host-synced (before the timing fix)"
    for key, v in r.items():
        if key == "config" and vf == "median_us":
            continue  # the kernel configuration a kernel bench's heuristic picked
        if (key.startswith("_") or key in PROVENANCE or key in DESCRIPTIVE or key in VALUE_FIELDS
                or key in COLUMN_FIELDS or key in ROW_FIELDS or key in ("bench", "variant")):
            continue
        if isinstance(v, float) and key not in ("act",):
            continue  # a float is a measurement, not a choice
        v = _hashable(v)
        if v in DEFAULT_VALUES or v in DEFAULT_SETTINGS.get(key, ()):
            continue
        grid[key] = v
    row = tuple((f, _hashable(r.get(f))) for f in ROW_FIELDS if r.get(f) is not None)
    col = " ".join(str(r[f]) for f in COLUMN_FIELDS if r.get(f) is not None) or "value"
    if r.get("variant") is not None:
        col = f"{r['variant']}: {col}"
    return tuple(sorted(grid.items())), row, col


def latest(rows: list[dict]) -> dict:
    """{grid: {row: {col: (value, [rows of the shown run])}}}, the rule of the module docstring."""
    cells: dict = defaultdict(list)
    for r in rows:
        c = classify(r)
        if c is not None:
            cells[c].append(r)
    grids: dict = defaultdict(lambda: defaultdict(dict))
    for (g, row, col), rs in cells.items():
        last = max(rs, key=lambda r: (r["_file"], r["_line"]))
        run = [r for r in rs if all(r.get(f) == last.get(f) for f in ("commit", "date", "command"))]
        vf = dict(g)["value"]
        grids[g][row][col] = (statistics.median(r[vf] for r in run), run)
    return grids


# ----------------------------------------------------------------------------------- formatting

def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _fold(col: str) -> str:
    """``qcompile[cfg]`` (one forced configuration) folds into ``qcompile[best forced]``."""
    m = re.fullmatch(r"(.*?)\[(.+)\]", col)
    return f"{m.group(1)}[best forced]" if m else col


def _col_order(cols) -> list[str]:
    def key(c):
        base = c.split()[-1]
        return (c.split()[0] != "bf16" if " " in c else False,
                0 if base == "qcompile" else 1 if base in PEERS or base == FLOOR else 2, c)
    return sorted(cols, key=key)


def _date(run_rows) -> str:
    return max(str(r.get("date", ""))[:10] for r in run_rows)


def grid_title(g: tuple) -> str:
    d = dict(g)
    parts = [d.pop("bench")]
    device = d.pop("device")
    d.pop("value")
    if d.get("flush") == "zero":
        d["flush"] = "zero-fill (do_bench's default)"
    if "model" in d:
        d["model"] = PRETTY_MODEL.get(d["model"], d["model"])
    parts += [f"{k} {v}" if k not in ("pattern",) else str(v) for k, v in d.items()]
    return " · ".join(parts) + f" — {device}"


def kernel_table(grid: dict) -> list[str]:
    """Rows = shapes, columns = implementations (us), then each peer's ratio to qcompile."""
    folded: dict = defaultdict(dict)
    for row, cols in grid.items():
        for col, (v, run) in cols.items():
            f = _fold(col)
            name = re.fullmatch(r".*?\[(.+)\]", col)
            if f not in folded[row] or v < folded[row][f][0]:
                folded[row][f] = (v, run, name.group(1) if name and f != col else None)
    cols = _col_order({c for cs in folded.values() for c in cs})
    base = "qcompile" if "qcompile" in cols else next(
        (c for c in cols if c.startswith("qcompile") and "[" not in c), None)
    peers = [c for c in cols if c in PEERS and c != base]
    # each variant's column against the same impl's baseline variant
    variants = []
    for c in cols:
        _, sep, rest = c.partition(": ")
        b = next((f"{b}: {rest}" for b in VARIANT_BASES if f"{b}: {rest}" in cols), None)
        if sep and b and c != b:
            variants.append((c, b))
    row_fields = [f for f, _ in next(iter(folded))] if folded else []
    head = row_fields + [f"{c} us" for c in cols] + [
        f"{b.partition(': ')[0]} / {c}" for c, b in variants]
    if base:
        head += [f"{p} / {base}" for p in peers]
        if FLOOR in cols:
            head.append(f"{base} / {FLOOR}")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(folded, key=lambda r: [_sort_key(v) for _, v in r]):
        cells = folded[row]
        line = [str(v) for _, v in row]
        for c in cols:
            if c in cells:
                v, _, name = cells[c]
                line.append(_num(v) + (f" `{name}`" if name else ""))
            else:
                line.append("")
        line += [_ratio(cells[b][0], cells[c][0]) if b in cells and c in cells else ""
                 for c, b in variants]
        if base:
            b = cells.get(base, (None,))[0]
            line += [_ratio(cells[p][0], b) if p in cells and b else "" for p in peers]
            if FLOOR in cols:
                line.append(_ratio(b, cells[FLOOR][0]) if FLOOR in cells and b else "")
        out.append("| " + " | ".join(line) + " |")
    return out


def decode_table(grid: dict) -> list[str]:
    """Rows = batch, columns = format and impl (tokens/s), then each column against bf16."""
    cols = _col_order({c for cs in grid.values() for c in cs})
    row_fields = [f for f, _ in next(iter(grid))] if grid else []
    others = [c for c in cols if c != BASELINE]
    head = row_fields + [f"{c} tok/s" for c in cols]
    if BASELINE in cols:
        head += [f"{c} / bf16" for c in others]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(grid, key=lambda r: [_sort_key(v) for _, v in r]):
        cells = grid[row]
        line = [str(v) for _, v in row] + [_num(cells[c][0]) if c in cells else "" for c in cols]
        if BASELINE in cols:
            b = cells.get(BASELINE, (None,))[0]
            line += [_ratio(cells[c][0], b) if c in cells and b else "" for c in others]
        out.append("| " + " | ".join(line) + " |")
    return out


def grid_provenance(grid: dict) -> str:
    runs = {(r.get("commit"), str(r.get("command"))) for cols in grid.values()
            for _, run in cols.values() for r in run}
    dates = sorted({str(r.get("date", ""))[:10] for cols in grid.values()
                    for _, run in cols.values() for r in run})
    torch_v = sorted({str(r.get("torch")) for cols in grid.values() for _, run in cols.values()
                      for r in run})
    commits = sorted({c for c, _ in runs if c})
    cmds = sorted({c for _, c in runs})
    shown = "; ".join(f"`{c}`" for c in cmds[:3]) + (f"; and {len(cmds) - 3} more" if len(cmds) > 3 else "")
    dates = [d for d in dates if d] or ["(no date)"]
    return (f"Measured {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
            + f", torch {', '.join(torch_v)}, {len(commits)} commit(s) "
            f"({', '.join(c[:7] for c in commits[:6])}{', ...' if len(commits) > 6 else ''}); "
            f"commands: {shown}.")


# ---------------------------------------------------------------------------------- the pages

METHOD = """\
## Method

Kernel benches (`bench_w4a16.py`, `bench_w8a8.py`, `bench_stream.py`) time one call captured
in a CUDA graph, its replay timed by `triton.testing.do_bench` (the L2 flushed before every
replay), all implementations of a row in one process; the value is the median in
microseconds. `flush` names how the L2 was flushed: rows that predate the field used
do_bench's zero fill, which leaves the L2 full of dirty lines the next kernel must write back
(a weight read costs more than on a warm model). Decode benches (`bench_decode.py`,
`bench_gptfast.py`) time greedy decode steps of a Llama-3-8B-shaped model (8 layers unless
the grid says otherwise) under CUDA graphs and report tokens/s = batch x steps / seconds.
`benchmarks/NOTES.md` says how each results file was produced.

Implementations: `qcompile` is the backend's heuristic choice; `qcompile[best forced]` the
fastest configuration forced by name in the same run (its name in the cell); `cublas_bf16` a
bf16 `F.linear` on the dequantized weight; `tinygemm` `aten._weight_int4pack_mm`;
`inductor` / `inductor_max_autotune` the same dequant + linear compiled by Inductor;
`marlin` IST-DASLab's Marlin built from source (fp16 only; symmetric int4 g128, so in the
group-zeros grids a symmetric stand-in of the same bytes); `bitsandbytes` bitsandbytes'
`matmul_4bit` on the NF4 weight it quantizes itself; `read_floor` a kernel that only reads
the weight's bytes. A ratio `peer / qcompile` above 1
means qcompile is faster; `qcompile / read_floor` is how far above a pure weight read it is.
In decode grids each column is divided by bf16 under default Inductor at the same batch.

## Which measurement a cell shows

"""


def page(rows: list[dict]) -> str:
    grids = latest(rows)
    skipped = sum(1 for r in rows if classify(r) is None)
    doc = (__doc__ or "").split("The rules (also printed on the page):")[1].split('"""')[0]
    out = ["# Performance", "",
           "Generated by `python benchmarks/make_performance.py` from `benchmarks/results/*.jsonl`;",
           "do not edit by hand (a test checks that this page is current).", "",
           f"{len(rows)} result rows in {len({r['_file'] for r in rows})} files; "
           f"{skipped} without a value (failed cells) are not shown.", "",
           METHOD + doc.strip(), "", "## Summary", ""]
    out += summary(rows, grids)
    by_bench: dict = defaultdict(list)
    for g in grids:
        by_bench[dict(g)["bench"]].append(g)
    for bench in sorted(by_bench):
        out += ["", f"## {bench}", ""]
        for g in sorted(by_bench[bench], key=lambda g: grid_title(g)):
            grid = grids[g]
            out += [f"### {grid_title(g)}", "", grid_provenance(grid), ""]
            out += decode_table(grid) if dict(g)["value"] == "tokens_per_s" else kernel_table(grid)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _pick(grids, strict=True, **want):
    """The grid with exactly these fields (plus bench/device/value/flush) whose newest row is
    newest; None where there is none."""
    best = None
    for g, grid in grids.items():
        d = dict(g)
        extra = set(d) - set(want) - PICK_ANY
        if (extra and strict) or any(d.get(k) != v for k, v in want.items()) or "H100" not in d["device"]:
            continue
        newest = max((r["_file"], r["_line"]) for cols in grid.values()
                     for _, run in cols.values() for r in run)
        if best is None or newest > best[0]:
            best = (newest, g)
    return best and best[1]


# Grid fields a summary cell may have whatever their value (the grid is picked by recency).
PICK_ANY = {"bench", "device", "value", "flush", "config", "layers", "prompt", "new", "settings"}
SUMMARY_SHAPES = ((14336, 4096), (4096, 4096))
SUMMARY_M = (1, 16, 256, 2048)
# The decode table's columns after bf16: (header, the cells' format and impl).
DECODE_COLUMNS = (("W4A16", "w4a16 qcompile"), ("W8A16", "w8a16 qcompile"),
                  ("W8A8", "w8a8 qcompile"), ("NF4", "nf4 qcompile"))
# The layer table's rows: (the grid's fields, the format's label).
SUMMARY_PATTERNS = (({"bench": "bench_w4a16", "pattern": "w4a16_g128_zp"}, "W4A16 g128"),
                    ({"bench": "bench_w4a16", "pattern": "w4a16_g128_zp", "act": "fp16"},
                     "W4A16 g128, fp16 (AWQ)"),
                    ({"bench": "bench_w4a16", "pattern": "nf4_b64"}, "NF4 b64"),
                    ({"bench": "bench_w4a16", "pattern": "w8a16_pc"}, "W8A16"),
                    ({"bench": "w8a8", "pattern": "w8a8_dynamic"}, "W8A8 dynamic"))
# Its last columns, at these token counts: qcompile / read floor, and Marlin / qcompile.
SUMMARY_FLOOR_M = (1, 16)


def _ratios(at, num, den) -> str:
    """num's time over den's in the cells ``at`` (by M) of each of SUMMARY_FLOOR_M that has both."""
    return " / ".join(_ratio(at[m][num][0], at[m][den][0])
                      for m in SUMMARY_FLOOR_M if {num, den} <= set(at[m]))


def summary(rows, grids) -> list[str]:
    """The README's table: decode tokens/s against bf16, then per-layer ratios to cuBLAS bf16."""
    out, dates, devices = [], set(), set()
    dec = []
    for bench, model, label in (("decode", "qcompile.llama", "the project's Llama-3-8B-shaped model, 8 layers"),
                                ("decode", "transformers", "transformers' LlamaForCausalLM, same shapes"),
                                ("gptfast_decode", None, "gpt-fast-style model and decode loop, "
                                 "32 layers, gpt-fast's Inductor settings")):
        want = {"bench": bench} | ({"model": model} if model else {})
        g = _pick(grids, strict=bench != "gptfast_decode", **want)
        if g is None:
            continue
        grid = grids[g]
        for row in sorted(grid, key=lambda r: [_sort_key(v) for _, v in r]):
            batch = dict(row).get("batch")
            if batch not in (1, 8):
                continue
            cells = grid[row]
            if BASELINE not in cells:
                continue
            b = cells[BASELINE][0]
            parts = [f"{_num(cells[c][0])} ({_ratio(cells[c][0], b)})" if c in cells else ""
                     for _, c in DECODE_COLUMNS]
            dec.append(f"| {label} | {batch} | {_num(b)} | " + " | ".join(parts) + " |")
            for c in cells.values():
                dates.add(_date(c[1]))
            devices.add(dict(g)["device"])
    if dec:
        out += ["Decode on an H100, tokens/s (x bf16 compiled by Inductor under the same settings, CUDA graphs):", "",
                "| model | batch | bf16 | " + " | ".join(h for h, _ in DECODE_COLUMNS) + " |",
                "|---|---|---|" + "---|" * len(DECODE_COLUMNS)] + dec + [""]
    lay = []
    for want, label in SUMMARY_PATTERNS:
        g = _pick(grids, **want)
        if g is None:
            continue
        grid = grids[g]
        for n, k in SUMMARY_SHAPES:
            at = {m: grid.get((("n", n), ("k", k), ("m", m)), {}) for m in SUMMARY_M + SUMMARY_FLOOR_M}
            cells = []
            for m in SUMMARY_M:
                c = at[m]
                if "qcompile" in c and "cublas_bf16" in c:
                    cells.append(_ratio(c["cublas_bf16"][0], c["qcompile"][0]))
                    dates.add(_date(c["qcompile"][1]))
                else:
                    cells.append("")
            lay.append(f"| {label} | {n}x{k} | " + " | ".join(cells) + f" | {_ratios(at, 'qcompile', 'read_floor')}"
                       f" | {_ratios(at, 'marlin', 'qcompile')} |")
            devices.add(dict(g)["device"])
    if lay:
        at_m = "/".join(str(m) for m in SUMMARY_FLOOR_M)
        out += ["One linear layer, cuBLAS bf16 time / qcompile time (> 1: qcompile faster), "
                "L2 flushed (clean), bf16 activations unless named; then qcompile's time over "
                "a pure read of the weight's bytes (1.00x: at memory speed), and Marlin's time "
                "over qcompile's (fp16 only):", "",
                "| format | N x K | " + " | ".join(f"M={m}" for m in SUMMARY_M)
                + f" | x read floor, M={at_m} | Marlin / qcompile, M={at_m} |",
                "|---|---|" + "---|" * (len(SUMMARY_M) + 2)] + lay + [""]
    dates.discard("")
    if out:
        when = (f", {min(dates)}" + (f" to {max(dates)}" if max(dates) != min(dates) else "")
                if dates else "")
        out.append(f"Measured on {', '.join(sorted(devices))}{when}; "
                   "every grid, the method and the rule for which run a cell shows: "
                   "[docs/performance.md](docs/performance.md).")
    return out


def readme_block(rows) -> str:
    return "\n".join([BEGIN, *summary(rows, latest(rows)), END])


def with_readme_block(readme: str, block: str) -> str:
    i, j = readme.find(BEGIN), readme.find(END)
    if i < 0 or j < 0:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    return readme[:i] + block + readme[j + len(END):]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a generated page is stale")
    args = p.parse_args(argv)
    rows = load()
    want_page = page(rows)
    readme = README.read_text()
    want_readme = with_readme_block(readme, readme_block(rows))
    stale = [f for f, now, want in ((PAGE, PAGE.read_text() if PAGE.exists() else "", want_page),
                                    (README, readme, want_readme)) if now != want]
    if args.check:
        for f in stale:
            print(f"{f.relative_to(ROOT)} is stale: run python benchmarks/make_performance.py")
        return 1 if stale else 0
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(want_page)
    README.write_text(want_readme)
    print(f"wrote {PAGE.relative_to(ROOT)} and the README's table ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
