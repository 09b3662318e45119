"""What the benchmark scripts share: the commit a result row was measured at, the timing
``../shared/BASELINES.md`` prescribes (one call captured in a CUDA graph, its replay timed by
``triton.testing.do_bench``, the L2 flushed before every replay by *reading* a 256 MB buffer so
it holds clean lines, as in a model; medians), and the ``read_floor`` kernel: what only reading
a weight's bytes costs in that setting.

Flushes (``flush=``, recorded as ``"flush"`` in every result row):

- ``"clean"`` (default): do_bench's ``clear_cache`` swapped for :func:`read_flush`, a pure read
  of do_bench's own 256 MB buffer. The L2 is left full of clean lines of that buffer; the
  weights come from HBM and pay no write-back.
- ``"zero"``: do_bench's own flush, a zero-fill of that buffer, which leaves the L2 full of dirty
  lines whose write-back the timed kernel pays (a 29 MB int4 read: 16.8 us instead of about
  10). Every row recorded before the ``"flush"`` field existed was timed this way.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
from collections.abc import Callable, Iterator
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


FLUSHES = ("clean", "zero")
# the L2 of the largest GPU the scripts run on (H100/H200: 50 MB); a flush buffer must be
# well beyond it (or beyond the device's own L2 where torch reports a larger one)
L2_BYTES = 50 * 2**20


@functools.cache
def _device_l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0))


def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return L2_BYTES
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(L2_BYTES, _device_l2_bytes(index))


def read_flush(cache: torch.Tensor) -> None:
    """The clean flush: read every byte of ``cache`` (a sum; nothing of it is written), so the
    L2 then holds only clean lines of a buffer the timed call does not touch."""
    nbytes = cache.numel() * cache.element_size()
    if nbytes < 2 * _l2_bytes(cache.device):
        raise ValueError(f"read_flush: a {nbytes / 2**20:.0f} MiB buffer does not flush a "
                         f"{_l2_bytes(cache.device) / 2**20:.0f} MiB L2 (want at least twice it)")
    cache.sum()


@contextlib.contextmanager
def l2_flush(flush: str = "clean") -> Iterator[None]:
    """Within: ``triton.testing.do_bench`` flushes the L2 the ``flush`` way ("clean" or "zero").

    triton 3.x's do_bench calls ``triton.runtime.driver.active.clear_cache(cache)`` before
    every timed call, with ``cache = driver.get_empty_cache_for_benchmark()`` (256 MB). "clean"
    replaces that driver attribute by :func:`read_flush` for the duration and puts the original
    back on the way out, also when the body raises; "zero" leaves do_bench as it is. A triton
    without that API raises here rather than timing with a flush the rows would misname."""
    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")
    if flush == "zero":
        yield
        return
    import triton
    import triton.runtime  # noqa: F401 - triton.runtime.driver

    driver = getattr(getattr(getattr(triton, "runtime", None), "driver", None), "active", None)
    missing = [a for a in ("clear_cache", "get_empty_cache_for_benchmark")
               if not callable(getattr(driver, a, None))]
    if driver is None or missing:
        raise RuntimeError(
            f"flush='clean': triton {getattr(triton, '__version__', '?')} has no "
            f"triton.runtime.driver.active.{'/'.join(missing) or 'clear_cache'} (the L2 flush "
            "hook of triton 3.x's do_bench), so the clean flush cannot be installed; "
            "use flush='zero' (--flush zero) and the rows will say so")
    original = driver.clear_cache
    own = "clear_cache" in getattr(driver, "__dict__", {})
    driver.clear_cache = read_flush
    try:
        if triton.runtime.driver.active.clear_cache is not read_flush:
            raise RuntimeError("flush='clean': setting triton.runtime.driver.active.clear_cache "
                               "did not take (a new driver object on every access?)")
        yield
    finally:
        if own:
            driver.clear_cache = original
        else:  # the class's method again, not an instance attribute holding it
            try:
                delattr(driver, "clear_cache")
            except AttributeError:
                driver.clear_cache = original
        if driver.clear_cache != original:
            raise RuntimeError("l2_flush: could not restore the driver's clear_cache")


def time_graph(fn: Callable[[], object], rep_ms: int = 100, flush: str = "clean") -> float:
    """Median microseconds of the replay of a CUDA graph holding one call of fn, the L2
    flushed before every replay (``flush``: "clean" reads a 256 MB buffer, "zero" is
    do_bench's zero-fill; see :func:`l2_flush`)."""
    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")
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
    us = bench_us(graph.replay, rep_ms, flush)
    del graph
    return us


def bench_us(fn: Callable[[], object], rep_ms: int = 100, flush: str = "clean") -> float:
    """Median microseconds of fn() by ``triton.testing.do_bench`` under the ``flush`` L2
    flush (fn: a CUDA graph's replay, as :func:`time_graph` hands it)."""
    import triton.testing

    with l2_flush(flush):
        ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
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
    streaming those bytes costs in that setting. After the "zero" flush this includes
    writing back the dirty lines the fill left in the L2, as every kernel's reads must then;
    after the "clean" one (the default) it does not. A reference rather than a bound: a
    hand-written CUDA reader took 4-11% less on an H100, and the int8 decode kernel beats it
    at 58.7 MB (benchmarks/results/read_floor_sweep.jsonl)."""
    if t.numel() * t.element_size() % 4:
        raise ValueError("read_floor: the tensor's size must be a multiple of 4 bytes")
    kernel = _read_kernel()
    words = t.contiguous().view(torch.int32).reshape(-1)
    block, iters = 2048, 4
    grid = (-(-words.numel() // (block * iters)),)
    out = torch.empty(grid[0], dtype=torch.int32, device=t.device)
    return lambda: kernel[grid](words, out, words.numel(), BLOCK=block, ITERS=iters, num_warps=8)
