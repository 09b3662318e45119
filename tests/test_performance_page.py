"""docs/performance.md and the README's performance table are what
``python benchmarks/make_performance.py`` makes of benchmarks/results/*.jsonl, and the
generator copes with result files and fields it has never seen."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_performance",
                                               ROOT / "benchmarks" / "make_performance.py")
mp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp)


def test_page_is_current():
    assert mp.main(["--check"]) == 0, "run: python benchmarks/make_performance.py"


def test_readme_table_is_filled():
    block = mp.README.read_text().split(mp.BEGIN)[1].split(mp.END)[0]
    assert "tokens/s" in block and "docs/performance.md" in block


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_unknown_files_and_fields(tmp_path):
    prov = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "commit": "abc", "command": "x"}
    _write(tmp_path / "bench_w4a16.jsonl", [
        # an old row (no flush: do_bench's zero fill), then a newer run of the same cell
        {"bench": "bench_w4a16", "pattern": "w4a16_g128_zp", "n": 64, "k": 64, "m": 1,
         "impl": "qcompile", "median_us": 10.0, "date": "2026-01-01", **prov},
        {"bench": "bench_w4a16", "pattern": "w4a16_g128_zp", "n": 64, "k": 64, "m": 1,
         "impl": "qcompile", "median_us": 8.0, "date": "2026-01-02", **prov},
        {"bench": "bench_w4a16", "pattern": "w4a16_g128_zp", "n": 64, "k": 64, "m": 1,
         "impl": "cublas_bf16", "median_us": 16.0, "date": "2026-01-02", **prov},
        # the same cell with an explicit flush and an fp16 activation: grids of their own
        {"bench": "bench_w4a16", "pattern": "w4a16_g128_zp", "n": 64, "k": 64, "m": 1,
         "impl": "qcompile", "median_us": 5.0, "flush": "read", "act": "fp16", **prov},
    ])
    _write(tmp_path / "bench_gptfast.jsonl", [
        {"bench": "gptfast_decode", "config": "llama3-8b", "format": f, "batch": 1, "impl": i,
         "tokens_per_s": t, "settings": {"mode": "reduce-overhead"}, "all_taken_over": True,
         "new_field": "x", **prov}
        for f, i, t in (("bf16", "inductor", 100.0), ("w4a16", "qcompile", 250.0),
                        ("nf4", "qcompile", 190.0))
    ] + [{"bench": "gptfast_decode", "format": "w8a8", "batch": 1, "impl": "qcompile",
          "tokens_per_s": None, "error": "boom", **prov}])
    _write(tmp_path / "something_new.jsonl", [{"what": "probe", "impl": "a", "median_us": 1.5}])
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    rows = mp.load(tmp_path)
    page = mp.page(rows)
    assert "| 64 | 64 | 1 | 8.00 | 16.00 | 2.00x |" in page  # the newer run, ratio computed
    assert "flush zero-fill (do_bench's default)" in page and "flush read" in page
    assert "act fp16" in page
    assert "## gptfast_decode" in page and "2.50x" in page and "new_field x" in page
    assert "## something_new" in page and "1.50" in page
    assert "1 without a value" in page
    summary = "\n".join(mp.summary(rows, mp.latest(rows)))
    assert "gpt-fast" in summary and "250.0 (2.50x)" in summary
    # the NF4 column, last, its cell where a row has one (W8A8 failed: an empty cell)
    assert "| bf16 | W4A16 | W8A16 | W8A8 | NF4 |" in summary
    assert "| 100.0 | 250.0 (2.50x) |  |  | 190.0 (1.90x) |" in summary


def test_rounds_of_one_run_give_their_median(tmp_path):
    prov = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "commit": "c", "date": "d",
            "command": "rounds"}
    _write(tmp_path / "bench_w8a8.jsonl", [
        {"bench": "w8a8", "pattern": "w8a8_static", "n": 8, "k": 8, "m": 1, "impl": "qcompile",
         "median_us": v, "round": i, **prov} for i, v in enumerate((3.0, 1.0, 2.0))])
    grid = next(iter(mp.latest(mp.load(tmp_path)).values()))
    assert grid[(("n", 8), ("k", 8), ("m", 1))]["qcompile"][0] == 2.0


def test_layer_table_shows_the_read_floor_and_marlin(tmp_path):
    prov = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "commit": "c", "date": "d",
            "command": "grid", "bench": "bench_w4a16", "pattern": "w4a16_g128_zp", "flush": "clean"}
    times = {"qcompile": 20.0, "cublas_bf16": 40.0, "read_floor": 16.0, "marlin": 25.0}
    rows = [{"n": 4096, "k": 4096, "m": m, "impl": i, "median_us": v * m, **prov, **act}
            for act in ({}, {"act": "fp16"}) for m in (1, 16) for i, v in times.items()
            if i != "marlin" or act]  # Marlin runs fp16 only
    _write(tmp_path / "bench_w4a16.jsonl", rows)
    summary = mp.summary(rows := mp.load(tmp_path), mp.latest(rows))
    assert "| W4A16 g128 | 4096x4096 | 2.00x | 2.00x |  |  | 1.25x / 1.25x |  |" in summary
    assert "| W4A16 g128, fp16 (AWQ) | 4096x4096 | 2.00x | 2.00x |  |  | 1.25x / 1.25x | 1.25x / 1.25x |" in summary
