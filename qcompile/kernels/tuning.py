"""Which kernel runs a call: dispatch tables by token count, and the autotuner that fills them.

Both ops take a ``config`` string. It is empty (the kernel family's heuristic picks from M
at run time), one choice name (that kernel for every M), or a table by token-count range::

    "1-1:bf16.w4.gz.128x16x64.coop.sk/sk4,2-64:bf16.w4.gz.128x16x64.coop.sk/sk2,65-:..."

The table is read on the host at each call (parsed once, cached), so a symbolic M picks
its kernel at run time with no recompilation and nothing for a CUDA graph to capture but
the launch. A choice name is owned by a kernel family (``choice_from_name`` there).

:func:`autotune` fills a table at compile time: for each token-count bucket it times the
family's candidate kernels on the real prepared weight (Inductor's GPU benchmarker: L2
flushed, CUDA events) and keeps the fastest. A static M tunes that M only. The graph
rewrite calls it when Inductor's ``max_autotune`` (or ``max_autotune_gemm``) is on, e.g.
``mode="max-autotune"``; otherwise the heuristic runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import _compat

log = logging.getLogger("qcompile.kernels")

__all__ = ["BUCKETS", "Tuned", "autotune", "format_table", "lookup", "parse_table",
           "autotune_enabled"]

# (first M, last M or None for unbounded, the M that is timed for the bucket). The timed M
# is the bucket's largest (a kernel fast there is fast below it too, tiles permitting);
# the last bucket times a prefill-sized 4096.
BUCKETS: tuple[tuple[int, int | None, int], ...] = (
    (1, 1, 1), (2, 16, 16), (17, 32, 32), (33, 64, 64), (65, 128, 128),
    (129, 256, 256), (257, 1024, 1024), (1025, None, 4096),
)


def format_table(entries: Sequence[tuple[int, int | None, str]]) -> str:
    """The config string for ``(first M, last M | None, choice name)`` rows; neighbouring
    rows with the same choice are merged, and a table of one choice is just its name."""
    merged: list[list] = []
    for lo, hi, name in entries:
        if merged and merged[-1][2] == name and merged[-1][1] is not None and \
                merged[-1][1] + 1 == lo:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi, name])
    if len(merged) == 1 and merged[0][0] == 1 and merged[0][1] is None:
        return merged[0][2]
    return ",".join(f"{lo}-{'' if hi is None else hi}:{name}" for lo, hi, name in merged)


@functools.lru_cache(maxsize=1024)
def parse_table(config: str) -> tuple[tuple[int, int | None, str], ...]:
    """Rows of a config string (see the module docstring); ValueError when malformed."""
    if not config:
        return ()
    if ":" not in config:
        return ((1, None, config),)
    rows = []
    for part in config.split(","):
        rng, sep, name = part.partition(":")
        lo_s, dash, hi_s = rng.partition("-")
        if not sep or not dash or not name or not lo_s.isdigit() or (hi_s and not hi_s.isdigit()):
            raise ValueError(f"bad kernel config {config!r}: expected 'name' or "
                             f"'lo-hi:name,...', got part {part!r}")
        rows.append((int(lo_s), int(hi_s) if hi_s else None, name))
    return tuple(rows)


def lookup(config: str, m: int) -> str | None:
    """The choice name for token count m, or None (the family's heuristic decides)."""
    for lo, hi, name in parse_table(config):
        if lo <= m and (hi is None or m <= hi):
            return name
    return None


def autotune_enabled() -> bool:
    """Whether the compile in progress asked for autotuning (Inductor's max-autotune)."""
    from torch._inductor import config as inductor_config
    return bool(getattr(inductor_config, "max_autotune", False) or
                getattr(inductor_config, "max_autotune_gemm", False))


@dataclass(frozen=True)
class Tuned:
    """An autotuning result: the config string and, per timed M, (choice, microseconds)."""

    config: str
    timings: dict[int, list[tuple[str, float]]]

    def summary(self) -> str:
        """'M=1: name 12.3us' per bucket, winners only, for the report and the log."""
        return "; ".join(f"M={m}: {ts[0][0]} {ts[0][1]:.1f}us" for m, ts in self.timings.items())


def autotune(run: Callable[[str, torch.Tensor], object],
             candidates: Callable[[int], Sequence[str]],
             make_x: Callable[[int], torch.Tensor],
             m: int | None, what: str, heuristic_max_m: int = 0) -> Tuned:
    """Time ``run(choice, x)`` for every candidate at each bucket's M; keep the fastest.

    ``m`` None tunes every bucket (symbolic token count), else m alone. A candidate that
    raises is skipped (logged at debug level); a bucket where every candidate fails keeps
    the heuristic (no table row). Token counts up to ``heuristic_max_m`` keep the heuristic
    untimed (no row): the family's decode kernel, whose launch shapes timed one call alone
    (L2 flushed, idle GPU) rank otherwise than inside a model's step, where each GEMM
    follows another kernel (tuned decode steps ran slower; docs/design.md, heuristic).
    """
    if m is not None and m <= heuristic_max_m:
        return Tuned("", {})
    buckets = BUCKETS if m is None else ((1, None, m),)
    rows, timings = [], {}
    for lo, hi, mm in buckets:
        if hi is not None and hi <= heuristic_max_m:
            continue
        lo = max(lo, heuristic_max_m + 1)
        x = make_x(mm)
        timed = []
        for name in dict.fromkeys(candidates(mm)):
            try:
                run(name, x)  # first call: loads the library, surfaces errors
                us = _compat.benchmark_gpu(lambda name=name, x=x: run(name, x)) * 1e3
            except Exception as e:  # a config that cannot run this shape is not a choice
                log.debug("autotune %s M=%d: %s failed: %s", what, mm, name, e)
                continue
            timed.append((name, us))
        if not timed:
            continue
        timed.sort(key=lambda t: t[1])
        timings[mm] = timed
        rows.append((lo, hi, timed[0][0]))
        log.info("autotune %s M=%d: %s", what, mm,
                 ", ".join(f"{nm} {us:.1f}us" for nm, us in timed))
    return Tuned(format_table(rows) if rows else "", timings)
