"""Shared test fixtures: an fd-leak check on every test, and helper processes."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import short_tmp_dir

PEER_SCRIPT = Path(__file__).parent / "relay_peer.py"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_fd_leak: skip the per-test open-file-descriptor check"
    )


def _open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd listdir itself used, already gone
    return fds


@pytest.fixture(autouse=True, scope="session")
def _process_wide_fds() -> None:
    """Open once the fds libraries keep for the whole process, so no test is blamed."""
    with contextlib.suppress(ImportError):
        import asyncio  # noqa: PLC0415

        import uvloop  # noqa: PLC0415

        # libuv keeps a process-wide signal pipe from the first loop on.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.sleep(0))


@pytest.fixture(autouse=True)
def fd_leak_check(_process_wide_fds: None, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves more file descriptors open than it found."""
    if not os.path.isdir("/proc/self/fd") or request.node.get_closest_marker("allow_fd_leak"):
        yield
        return
    before = _open_fds()
    yield
    # Closing happens in finalizers and on gc; give them a moment to settle.
    after = _open_fds()
    for _ in range(50):
        if len(after) <= len(before):
            return
        gc.collect()
        time.sleep(0.02)
        after = _open_fds()
    new = sorted((fd, target) for fd, target in after.items() if before.get(fd) != target)
    pytest.fail(
        f"{len(after) - len(before)} file descriptor(s) leaked: "
        + ", ".join(f"{fd}->{target}" for fd, target in new[:20]),
        pytrace=False,
    )


@contextlib.contextmanager
def peer_process(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``tests/relay_peer.py ARGS`` until the block ends.

    Waits for the child's ``ready`` line (its socket is listening), then
    terminates and reaps it on exit. Subcommands: ``echo PATH``,
    ``relay LISTEN TARGET [--mode M] [--uvloop]``.
    """
    proc = subprocess.Popen(
        [sys.executable, str(PEER_SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"peer {args} did not start: {line!r}, exit {proc.poll()}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private temp dir with a short path, for socket files (sun_path holds 107 bytes)."""
    with short_tmp_dir() as path:
        yield path
