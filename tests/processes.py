"""Our own guest and host as real processes, and the small services tests forward to."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def short_tmp_dir(prefix: str = "sf-") -> Iterator[Path]:
    """A private temporary directory with a short path (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Running:
    """A `python -m socketforward ...` child; ``stop()`` sends SIGTERM and returns its status."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"did not stop on SIGTERM; log:\n{self.log()}") from None
        return self.proc.returncode


@contextlib.contextmanager
def socketforward(args: list[str], log_path: Path) -> Iterator[Running]:
    """Start ``socketforward ARGS`` with its log in ``log_path``; always reaped on exit."""
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "socketforward", "-v", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Running(proc, log_path)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_socket(path: Path, timeout: float = 30, *procs: Running) -> None:
    """Wait until ``path`` is a socket file (a Bind happened), failing early if a process died."""
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        for running in procs:
            if running.proc.poll() is not None:
                raise AssertionError(f"process exited early; log:\n{running.log()}")
        if time.monotonic() > deadline:
            logs = "\n".join(r.log() for r in procs)
            raise AssertionError(f"{path} did not appear within {timeout}s\n{logs}")
        time.sleep(0.02)


def embedded_endpoints(tmp: Path) -> tuple[str, str]:
    """The RPC and stream endpoints of an embedded Host and Guest pair in *tmp*:
    the host's RPC socket in a directory only its user enters."""
    (tmp / "host").mkdir(mode=0o700, parents=True, exist_ok=True)
    return f"unix:{tmp}/host/rpc.sock", f"unix:{tmp}/streams.sock"


async def echo_server(path: Path) -> asyncio.Server:
    """A UNIX echo service (echoes until EOF, then half-closes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_unix_server(handle, path=str(path), backlog=4096)


async def echo_round_trip(path: Path, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send ``payload`` through the socket at ``path`` and read the same length back."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
        got = await reader.readexactly(len(payload)) if payload else b""
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
