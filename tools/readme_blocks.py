"""README's generated blocks: the text between a generator's two markers, and the command line
the generators share (tools/support_matrix.py, tools/support_grid.py): no argument prints the
block, ``--write`` replaces README's block, ``--check`` exits 1 when README's differs."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

README = Path(__file__).resolve().parents[1] / "README.md"


def block_of(text: str, begin: str, end: str) -> str | None:
    """The block of ``text`` from ``begin`` to ``end``, markers included (None: no markers)."""
    if begin not in text or end not in text:
        return None
    start = text.index(begin)
    return text[start:text.index(end, start) + len(end)]


def run(argv: list[str], begin: str, end: str, render: Callable[[], str]) -> int:
    text = README.read_text(encoding="utf-8")
    block = render()
    if "--write" in argv:
        old = block_of(text, begin, end)
        if old is None:
            print(f"README.md has no {begin!r} marker", file=sys.stderr)
            return 1
        README.write_text(text.replace(old, block), encoding="utf-8")
        return 0
    if "--check" in argv:
        return 0 if block_of(text, begin, end) == block else 1
    print(block)
    return 0
