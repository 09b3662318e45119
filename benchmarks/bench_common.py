"""What the benchmark scripts share: the commit a result row was measured at, and the timing
``../shared/BASELINES.md`` prescribes (one call captured in a CUDA graph, its replay timed by
``triton.testing.do_bench``, which flushes the L2 before every replay; medians)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch


def commit() -> str:
    """The short hash of the code being measured: ``$QCOMPILE_COMMIT`` where the checkout's git
    metadata is not that code (a working tree copied to a remote machine), else git's HEAD."""
    if os.environ.get("QCOMPILE_COMMIT"):
        return os.environ["QCOMPILE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_graph(fn: Callable[[], object], rep_ms: int = 100) -> float:
    """Median microseconds of the replay of a CUDA graph holding one call of fn."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: compile, load libraries, autotune outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median")
    del graph
    return ms * 1e3
