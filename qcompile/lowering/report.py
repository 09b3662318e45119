"""The match report: one record per matmul node, matched or not and why.

A ``Report`` is data (a list of ``MatchRecord``) that prints as a table. The pass adds
records as it decides; each decision is also one INFO line on the ``qcompile`` logger
(``TORCH_LOGS="qcompile"``), and the graphs before and after the rewrite go to DEBUG
(``TORCH_LOGS="+qcompile"``) and, with ``QCOMPILE_DEBUG_DIR`` set, to files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("qcompile")


@dataclass
class MatchRecord:
    """What the pass decided for one matmul node."""

    node: str                 # the matmul node's name in the ATen graph
    op: str                   # aten op: mm, addmm, _int_mm, bmm
    matched: bool
    reason: str = ""          # why not matched
    format: str = ""          # e.g. "w4a16 uint4 g128+zeros"
    bits: int | None = None
    group_size: int | None = None
    m: str = ""               # rows (tokens); symbolic when dynamic
    n: int | None = None
    k: int | None = None
    dtype: str = ""           # activation / output dtype
    kernel: str = ""          # implementation the op runs on
    source: str = ""          # module path from the user's model, where known

    def summary(self) -> str:
        where = f" ({self.source})" if self.source else ""
        if self.matched:
            return (f"matched {self.node}{where}: {self.format}, M={self.m} N={self.n} "
                    f"K={self.k}, {self.dtype} -> {self.kernel}")
        return f"not matched {self.node}{where}: {self.reason}"


@dataclass
class Report:
    """All match records of one or more compiled graphs."""

    records: list[MatchRecord] = field(default_factory=list)
    graphs: int = 0           # compiled graphs these records come from
    notes: list[str] = field(default_factory=list)  # graph-level findings (warnings)

    @property
    def matched(self) -> list[MatchRecord]:
        return [r for r in self.records if r.matched]

    @property
    def unmatched(self) -> list[MatchRecord]:
        return [r for r in self.records if not r.matched]

    def add(self, record: MatchRecord) -> None:
        self.records.append(record)
        log.info("%s", record.summary())

    def extend(self, other: Report) -> None:
        self.records.extend(other.records)
        self.graphs += other.graphs
        self.notes.extend(other.notes)

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __str__(self) -> str:
        head = ("node", "source", "op", "result", "format", "M", "N", "K", "dtype",
                "kernel / reason")
        rows = [head]
        for r in self.records:
            rows.append((r.node, r.source or "-", r.op, "matched" if r.matched else "-",
                         r.format or "-", r.m or "-", str(r.n or "-"), str(r.k or "-"),
                         r.dtype or "-", r.kernel if r.matched else r.reason))
        widths = [max(len(row[i]) for row in rows[:]) for i in range(len(head) - 1)]
        lines = []
        for i, row in enumerate(rows):
            cells = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("-" * len(lines[0]))
        lines.append(f"{len(self.matched)} of {len(self.records)} matmuls run as qcompile ops")
        lines.extend(f"warning: {note}" for note in self.notes)
        return "\n".join(lines)


_graph_counter = [0]


def dump_graph(stage: str, graph_text: str) -> None:
    """Log a graph at DEBUG and write it under $QCOMPILE_DEBUG_DIR when set."""
    log.debug("graph %s:\n%s", stage, graph_text)
    out = os.environ.get("QCOMPILE_DEBUG_DIR")
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        if stage == "before":
            _graph_counter[0] += 1
        (path / f"graph_{_graph_counter[0]:03d}_{stage}.txt").write_text(graph_text)
