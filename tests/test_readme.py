"""The README's examples run: every ```python block preceded by ``<!-- ci: run -->`` is
executed, in order, in one namespace (a later block may use an earlier one's names), on the
CPU with the reference kernels."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = re.compile(r"<!-- ci: run -->\s*\n```python\n(.*?)```", re.S)


def blocks() -> list[str]:
    return MARK.findall(README.read_text())


def test_readme_has_marked_blocks():
    assert len(blocks()) >= 2


def test_readme_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files an example writes land here
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks()):
        exec(compile(code, f"README.md block {i}", "exec"), namespace)
