"""What the benchmark scripts share: the commit a result row was measured at, the timing
``../shared/BASELINES.md`` prescribes (one call captured in a CUDA graph, its replay timed by
``triton.testing.do_bench``, which flushes the L2 before every replay; medians), and the
``read_floor`` kernel: what only reading a weight's bytes costs in that setting."""

from __future__ import annotations

import functools
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


@functools.cache
def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(ptr, out, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        base = tl.program_id(0) * BLOCK * ITERS
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for i in tl.static_range(ITERS):  # unrolled: the ITERS loads of a thread in flight at once
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(ptr + offs, mask=offs < n_words, other=0)
        tl.store(out + tl.program_id(0), tl.sum(acc))
    return read_kernel


def read_floor(t: torch.Tensor) -> Callable[[], object]:
    """A call that only reads the bytes of ``t`` (a plain Triton kernel summing them as int32
    words, one small store a program), timed the same way as the GEMMs beside it: what
    streaming those bytes costs in that setting. After do_bench's zero-fill flush this
    includes writing back the dirty lines the fill left in the L2, as every kernel's reads
    must. A reference rather than a bound: a hand-written CUDA reader took 4-11% less on an
    H100, and the int8 decode kernel beats it at 58.7 MB (benchmarks/NOTES.md)."""
    if t.numel() * t.element_size() % 4:
        raise ValueError("read_floor: the tensor's size must be a multiple of 4 bytes")
    kernel = _read_kernel()
    words = t.contiguous().view(torch.int32).reshape(-1)
    block, iters = 2048, 4
    grid = (-(-words.numel() // (block * iters)),)
    out = torch.empty(grid[0], dtype=torch.int32, device=t.device)
    return lambda: kernel[grid](words, out, words.numel(), BLOCK=block, ITERS=iters, num_warps=8)
