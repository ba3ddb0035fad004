"""The benchmarks' reports are Markdown: tables, and the command that made them."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Sequence

RIGHT = "r"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """A table's lines; ``align`` has one letter a column, ``r`` right-aligns it
    (columns past its end are left-aligned)."""
    rule = ["--:" if align[i : i + 1] == RIGHT else "---" for i in range(len(header))]
    return [row(header), "|" + "|".join(rule) + "|", *(row(cells) for cells in rows)]


def row(cells: Sequence[str]) -> str:
    """One table row (an empty cell stays ``| |``)."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def command_line(module: str, uv_args: str = "") -> str:
    """How this benchmark was run: ``python -m module`` and its arguments, with
    the ``uv run`` prefix when uv started it."""
    prefix = (
        f"uv run --locked --all-extras {uv_args + ' ' if uv_args else ''}"
        if os.environ.get("UV_RUN_RECURSION_DEPTH")
        else ""
    )
    return prefix + shlex.join(["python", "-m", module, *sys.argv[1:]])
