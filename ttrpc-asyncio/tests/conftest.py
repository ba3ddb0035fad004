"""The Echo fixtures, and a check that no test leaves a file descriptor open."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Iterator

import pytest

from echo.fixtures import client, echo_server

__all__ = ["client", "echo_server", "no_fd_leak"]


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True, scope="session")
def _uvloop_signal_pipe() -> None:
    """libuv keeps a process-wide signal pipe from its first loop on: open it
    before the first test counts descriptors, so that test is not blamed."""
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.sleep(0))


@pytest.fixture(autouse=True)
def no_fd_leak(_uvloop_signal_pipe: None) -> Iterator[None]:
    """Fail a test that leaves more file descriptors open than it found: the
    library owns the sockets it is given and must close them on every path."""
    before = _open_fds()
    yield
    for _ in range(50):  # closing happens in finalizers and on gc: let them run
        after = _open_fds()
        if len(after) <= len(before):
            return
        gc.collect()
        time.sleep(0.02)
    pytest.fail(f"file descriptors left open: {sorted(after - before)}", pytrace=False)
