"""Load generator and process bookkeeping shared by the relay and forward benchmarks.

The target service (``serve``) runs in its own process; the load runs in the
benchmark's own process, with blocking sockets for bulk transfers and round
trips, and one epoll loop (no threads) for the many-connection workloads, so
the load itself stays cheap. Its DIRECT figures show its ceiling.

Target protocol, chosen so that no workload needs a half-close (nerdbox's
relay tears a connection down at the first EOF): first byte ``U`` + u64 size:
read exactly that many bytes, answer the count as u64; ``D`` + u64 size: send
that many bytes, then close; anything else: echo until EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from socketforward import runner

GiB = 1 << 30
MiB = 1 << 20
COUNT = struct.Struct(">Q")
UPLOAD = b"U"
DOWNLOAD = b"D"
ECHO = b"x"


# -- the target service (a child process) -----------------------------------------


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on the loop socketforward's own processes use (uvloop when installed)."""
    runner.run(main())


class _Target(asyncio.BufferedProtocol):
    """One target-service connection; protocol callbacks, uvloop's fast path."""

    def __init__(self, block: memoryview, buf: memoryview) -> None:
        self.block = block
        # Shared by every connection: each buffer_updated consumes it at once
        # (one MiB per connection cost the service more than the forwarders).
        self.buf = buf
        self.transport: asyncio.Transport | None = None
        self.mode = b""
        self.header = b""
        self.size = self.count = self.left = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buf[:nbytes]
        assert self.transport is not None
        if self.mode == b"":
            self.mode = bytes(data[:1])
            if self.mode not in (UPLOAD, DOWNLOAD):
                self.mode = ECHO
            else:
                data = data[1:]
        if self.mode == ECHO:
            self.transport.write(bytes(data))
            return
        if len(self.header) < COUNT.size:
            take = COUNT.size - len(self.header)
            self.header += bytes(data[:take])
            data = data[take:]
            if len(self.header) < COUNT.size:
                return
            (self.size,) = COUNT.unpack(self.header)
            if self.mode == DOWNLOAD:
                self.left = self.size
                self._send()
                return
        self.count += len(data)
        if self.mode == UPLOAD and self.count >= self.size:
            self.transport.write(COUNT.pack(self.count))

    def _send(self) -> None:
        assert self.transport is not None
        while self.left and not self.paused:
            n = min(self.left, MiB)
            self.transport.write(self.block[:n])
            self.left -= n
        if not self.left:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == DOWNLOAD and self.left:
            self._send()

    def eof_received(self) -> bool:
        return False  # close


async def serve(path: str) -> None:
    """The target service on ``path``: upload counter, download source, echo."""
    loop = asyncio.get_running_loop()
    block = memoryview(os.urandom(MiB))
    buf = memoryview(bytearray(MiB))
    server = await loop.create_unix_server(lambda: _Target(block, buf), path=path, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# -- processes ------------------------------------------------------------------------


def raise_fd_limit() -> None:
    """Bursts and idle-connection runs hold thousands of fds (children inherit)."""
    import resource  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, SIGKILL what is still there after 5 s; reap all.

    Their own children (socat forks one per connection) go first, so their
    parent reaps them: orphans would be left to PID 1, which may not reap.
    """
    procs = list(procs)
    children = [pid for proc in procs for pid in _tree(proc.pid)[1:]]
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(
        _tree(proc.pid)[1:] for proc in procs if proc.poll() is None
    ):
        time.sleep(0.02)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for_path(path: str, timeout: float, *procs: subprocess.Popen[bytes]) -> None:
    """Wait until ``path`` exists; fail early if one of ``procs`` exited."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


def wait_ready_line(proc: subprocess.Popen[bytes], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        raise RuntimeError(f"{what} did not start: {line!r}")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (socat forks one child per connection)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of ``pids``, including their reaped children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / tick
    return total


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident set of ``pids`` and all their descendants."""
    total = 0
    for root in pids:
        for pid in _tree(root):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
    return total


# -- blocking workloads ---------------------------------------------------------------


def connect(path: str, timeout: float = 30) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _recv_count(sock: socket.socket) -> int:
    reply = b""
    while len(reply) < COUNT.size:
        data = sock.recv(COUNT.size - len(reply))
        if not data:
            raise ConnectionError(f"EOF after {len(reply)} bytes of the count")
        reply += data
    (count,) = COUNT.unpack(reply)
    return int(count)


def upload(path: str, size: int, chunk: bytes) -> float:
    """Send ``size`` bytes, check the service counted them all; seconds taken."""
    t0 = time.perf_counter()
    with connect(path) as sock:
        sock.sendall(UPLOAD + COUNT.pack(size))
        view = memoryview(chunk)
        left = size
        while left:
            n = min(left, len(view))
            sock.sendall(view[:n])
            left -= n
        got = _recv_count(sock)
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{path}: service counted {got} bytes, sent {size}")
    return elapsed


def download(path: str, size: int) -> float:
    """Receive ``size`` bytes (read until all have come, then close); seconds taken."""
    buf = memoryview(bytearray(MiB))
    t0 = time.perf_counter()
    with connect(path) as sock:
        sock.sendall(DOWNLOAD + COUNT.pack(size))
        got = 0
        while got < size:
            n = sock.recv_into(buf)
            if not n:
                break
            got += n
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{path}: received {got} bytes, expected {size}")
    return elapsed


def round_trips(path: str, count: int, warmup: int = 200) -> list[float]:
    """1-byte round trips on one connection; sorted samples in microseconds."""
    samples = []
    with connect(path) as sock:
        for i in range(count + warmup):
            t0 = time.perf_counter_ns()
            sock.sendall(ECHO)
            if sock.recv(1) != ECHO:
                raise RuntimeError(f"{path}: echo lost")
            if i >= warmup:
                samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    return samples


def percentile(sorted_samples: list[float], p: float) -> float:
    return sorted_samples[min(len(sorted_samples) - 1, int(len(sorted_samples) * p))]


# -- many connections at once (one epoll loop) -----------------------------------------


@dataclass
class _Conn:
    sock: socket.socket
    started: float


def _open_nonblocking(path: str) -> tuple[socket.socket | None, int]:
    """A connected non-blocking socket, or (None, errno) when refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    err = sock.connect_ex(path)
    if err:
        # A UNIX listener with a full backlog answers EAGAIN at once.
        sock.close()
        return None, err
    return sock, 0


def connection_rate(path: str, seconds: float, workers: int) -> tuple[float, int]:
    """``workers`` concurrent loops of connect, 1-byte echo, close for ``seconds``.

    Returns (completed connections per second, failures).
    """
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    done = failed = 0

    def start() -> None:
        nonlocal failed
        while True:
            sock, err = _open_nonblocking(path)
            if sock is not None:
                break
            failed += 1
            if err not in (errno.EAGAIN, errno.ECONNREFUSED):
                raise OSError(err, os.strerror(err), path)
        try:
            sock.send(ECHO)
        except OSError:
            failed += 1
            sock.close()
            return
        conns[sock.fileno()] = _Conn(sock, time.perf_counter())
        ep.register(sock.fileno(), select.EPOLLIN)

    t0 = time.perf_counter()
    stop = t0 + seconds
    try:
        for _ in range(workers):
            start()
        while conns:
            for fd, _events in ep.poll(0.5):
                conn = conns.pop(fd)
                ep.unregister(fd)
                try:
                    ok = conn.sock.recv(1) == ECHO
                except OSError:
                    ok = False
                conn.sock.close()
                if ok:
                    done += 1
                else:
                    failed += 1
                if time.perf_counter() < stop:
                    start()
            if time.perf_counter() > stop + 10:
                break  # answers that never come: counted as failures below
        elapsed = time.perf_counter() - t0
        failed += len(conns)
    finally:
        for conn in conns.values():
            conn.sock.close()
        ep.close()
    return done / elapsed, failed


@dataclass
class BurstResult:
    served: int = 0
    refused: int = 0  # connect() failed: listener backlog full or gone
    reset: int = 0  # accepted, then closed or reset without an answer
    hung: int = 0  # no answer within the bound
    seconds: float = 0.0  # until the last answer (or the bound)


def burst(path: str, count: int, bound: float) -> BurstResult:
    """``count`` connects as fast as possible, each sends one byte; wait up to
    ``bound`` seconds for every echo."""
    result = BurstResult()
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    t0 = time.perf_counter()
    try:
        for _ in range(count):
            sock, _err = _open_nonblocking(path)
            if sock is None:
                result.refused += 1
                continue
            try:
                sock.send(ECHO)
            except OSError:
                result.reset += 1
                sock.close()
                continue
            socks[sock.fileno()] = sock
            ep.register(sock.fileno(), select.EPOLLIN)
        deadline = t0 + bound
        while socks and (left := deadline - time.perf_counter()) > 0:
            for fd, _events in ep.poll(min(left, 0.5)):
                sock = socks.pop(fd)
                ep.unregister(fd)
                try:
                    ok = sock.recv(1) == ECHO
                except OSError:
                    ok = False
                sock.close()
                if ok:
                    result.served += 1
                else:
                    result.reset += 1
        result.hung = len(socks)
        result.seconds = time.perf_counter() - t0
    finally:
        for sock in socks.values():
            sock.close()
        ep.close()
    return result


@contextlib.contextmanager
def idle_connections(path: str, count: int, concurrency: int, bound: float) -> Iterator[int]:
    """Open ``count`` connections, each answered once (1-byte echo), and hold them
    open for the block; yields how many were answered. At most ``concurrency``
    wait for an answer at a time (nerdbox's host serves one at a time)."""
    ep = select.epoll()
    waiting: dict[int, socket.socket] = {}
    held: list[socket.socket] = []
    opened = 0
    deadline = time.perf_counter() + bound
    try:
        while (opened < count or waiting) and time.perf_counter() < deadline:
            while opened < count and len(waiting) < concurrency:
                opened += 1
                sock, _err = _open_nonblocking(path)
                if sock is None:
                    continue
                try:
                    sock.send(ECHO)
                except OSError:
                    sock.close()
                    continue
                waiting[sock.fileno()] = sock
                ep.register(sock.fileno(), select.EPOLLIN)
            for fd, _events in ep.poll(0.5):
                sock = waiting.pop(fd)
                ep.unregister(fd)
                try:
                    ok = sock.recv(1) == ECHO
                except OSError:
                    ok = False
                if ok:
                    held.append(sock)
                else:
                    sock.close()
        yield len(held)
    finally:
        for sock in [*waiting.values(), *held]:
            sock.close()
        ep.close()
