"""The README shows the library as it is: its examples are valid Python and
every ``ttrpc.X`` it names exists."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import ttrpc_asyncio

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_python_examples_compile() -> None:
    """Each ```python block of the README is valid Python."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "README.md", "exec")


def test_every_named_api_exists() -> None:
    """``ttrpc.Client.connect_unix``, ``ttrpc_asyncio.Error`` and the like, in the
    examples and the text, are attributes of the package (a renamed API breaks
    this test, not a reader's program)."""
    names = set(re.findall(r"\bttrpc(?:_asyncio)?\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", README))
    assert {"Client.connect_unix", "Server", "TtrpcError"} <= names
    missing = set()
    for name in names:
        try:
            functools.reduce(getattr, name.split("."), ttrpc_asyncio)
        except AttributeError:
            missing.add(name)
    assert not missing
