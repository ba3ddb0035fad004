"""tests/vm: slow VM runs are deselected unless ``-m`` is given; CI says when VM tests skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _in_vm_dir(item: pytest.Item) -> bool:
    return HERE in Path(item.path).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The 256 MiB run belongs to `make vm-demo` (-m slow), not to the default suite.
    if config.option.markexpr:
        return
    slow = [i for i in items if _in_vm_dir(i) and i.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if i not in slow]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not os.environ.get("CI"):
        return
    for report in terminalreporter.stats.get("skipped", []):
        if "tests/vm/" in report.nodeid:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            terminalreporter.write_line(f"CI: VM TEST SKIPPED {report.nodeid}: {reason}", red=True)
