"""The load generator of the relay and forward benchmarks: the client side of
the target service's protocol (bench/target.py).

The load runs in the benchmark's own process, with blocking sockets for bulk
transfers and round trips, and one epoll loop (no threads) for the
many-connection workloads, so the load itself stays cheap. Its DIRECT figures
show its ceiling. bench/goload.py runs the same workloads from a Go program
(:class:`Load` is what both offer).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from bench.target import COUNT, DOWNLOAD, ECHO, UPLOAD

GiB = 1 << 30
MiB = 1 << 20


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


def first_bytes(path: str, count: int, warmup: int = 20) -> list[float]:
    """Time to first byte of new connections, one after another: connect, send
    1 byte, receive it back, close; sorted samples in microseconds."""
    samples = []
    for i in range(count + warmup):
        t0 = time.perf_counter_ns()
        with connect(path) as sock:
            sock.sendall(ECHO)
            if sock.recv(1) != ECHO:
                raise RuntimeError(f"{path}: no first byte")
            t1 = time.perf_counter_ns()
        if i >= warmup:
            samples.append((t1 - t0) / 1000)
    samples.sort()
    return samples


# -- many connections at once (one epoll loop) -----------------------------------------


SEND_FAILED = -1
"""What :meth:`_Echoes.open` returns when the connect worked and the send did not."""


class _Echoes:
    """Connections that sent their one byte, watched by one epoll for the echo."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ep = select.epoll()
        self.socks: dict[int, socket.socket] = {}

    def __len__(self) -> int:
        return len(self.socks)

    def open(self) -> int:
        """Connect (non-blocking) and send the byte: 0 once the connection is
        watched, else the connect's errno or SEND_FAILED."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(self.path)
        if err:
            # A UNIX listener with a full backlog answers EAGAIN at once.
            sock.close()
            return err
        try:
            sock.send(ECHO)
        except OSError:
            sock.close()
            return SEND_FAILED
        self.socks[sock.fileno()] = sock
        self.ep.register(sock.fileno(), select.EPOLLIN)
        return 0

    def answers(self, timeout: float) -> Iterator[tuple[socket.socket, bool]]:
        """Each connection that became readable within ``timeout``, no longer
        watched, and whether it echoed the byte (the caller owns it now)."""
        for fd, _events in self.ep.poll(timeout):
            sock = self.socks.pop(fd)
            self.ep.unregister(fd)
            try:
                ok = sock.recv(1) == ECHO
            except OSError:
                ok = False
            yield sock, ok

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.ep.close()


def connection_rate(path: str, seconds: float, workers: int) -> tuple[float, int]:
    """``workers`` concurrent loops of connect, 1-byte echo, close for ``seconds``.

    Returns (completed connections per second, failures).
    """
    conns = _Echoes(path)
    done = failed = 0

    def start() -> None:
        nonlocal failed
        while err := conns.open():
            failed += 1
            if err == SEND_FAILED:
                return
            if err not in (errno.EAGAIN, errno.ECONNREFUSED):
                raise OSError(err, os.strerror(err), path)

    t0 = time.perf_counter()
    stop = t0 + seconds
    try:
        for _ in range(workers):
            start()
        while conns:
            for sock, ok in conns.answers(0.5):
                sock.close()
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
        conns.close()
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
    socks = _Echoes(path)
    t0 = time.perf_counter()
    try:
        for _ in range(count):
            err = socks.open()
            if err == SEND_FAILED:
                result.reset += 1
            elif err:
                result.refused += 1
        deadline = t0 + bound
        while socks and (left := deadline - time.perf_counter()) > 0:
            for sock, ok in socks.answers(min(left, 0.5)):
                sock.close()
                if ok:
                    result.served += 1
                else:
                    result.reset += 1
        result.hung = len(socks)
        result.seconds = time.perf_counter() - t0
    finally:
        socks.close()
    return result


@contextlib.contextmanager
def idle_connections(path: str, count: int, concurrency: int, bound: float) -> Iterator[int]:
    """Open ``count`` connections, each answered once (1-byte echo), and hold them
    open for the block; yields how many were answered. At most ``concurrency``
    wait for an answer at a time (nerdbox's host serves one at a time)."""
    waiting = _Echoes(path)
    held: list[socket.socket] = []
    opened = 0
    deadline = time.perf_counter() + bound
    try:
        while (opened < count or waiting) and time.perf_counter() < deadline:
            while opened < count and len(waiting) < concurrency:
                opened += 1
                waiting.open()  # a connection refused or reset is not held
            for sock, ok in waiting.answers(0.5):
                if ok:
                    held.append(sock)
                else:
                    sock.close()
        yield len(held)
    finally:
        waiting.close()
        for sock in held:
            sock.close()


# -- either load generator -------------------------------------------------------------


class Load(Protocol):
    """The workloads forward_bench runs, from this module or from the Go
    program of bench/goload.py (same results, same checks)."""

    name: str

    def upload(self, path: str, size: int) -> float: ...
    def download(self, path: str, size: int) -> float: ...
    def round_trips(self, path: str, count: int) -> list[float]: ...
    def first_bytes(self, path: str, count: int) -> list[float]: ...
    def connection_rate(self, path: str, seconds: float, workers: int) -> tuple[float, int]: ...
    def burst(self, path: str, count: int, bound: float) -> BurstResult: ...


class PythonLoad:
    """This module's workloads, run in the calling process."""

    name = "Python"

    def __init__(self) -> None:
        self.chunk = os.urandom(MiB)

    def upload(self, path: str, size: int) -> float:
        return upload(path, size, self.chunk)

    def download(self, path: str, size: int) -> float:
        return download(path, size)

    def round_trips(self, path: str, count: int) -> list[float]:
        return round_trips(path, count)

    def first_bytes(self, path: str, count: int) -> list[float]:
        return first_bytes(path, count)

    def connection_rate(self, path: str, seconds: float, workers: int) -> tuple[float, int]:
        return connection_rate(path, seconds, workers)

    def burst(self, path: str, count: int, bound: float) -> BurstResult:
        return burst(path, count, bound)
