"""The byte relay: exact transfers, half-close, resets, backpressure, scale, processes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import random
import resource
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest

from socketforward.relay import COPY_BUFFER_SIZE, Relay, RelayStats, relay
from socketforward.transport import UnixEndpoint, connect, listen
from tests.conftest import peer_process, rss_bytes

MODES = ["splice", "copy"]
MiB = 1 << 20
_BLOCK = random.Random(7).randbytes(MiB)
_DOUBLE = memoryview(_BLOCK * 2)


def _chunks(size: int, seed: int, chunk: int = 256 * 1024) -> list[memoryview]:
    """Deterministic data: every chunk is a different rotation of one random block."""
    view = _DOUBLE
    out = []
    i = 0
    while size > 0:
        n = min(chunk, size)
        off = (i * 7919 + seed * 104729) % MiB
        out.append(view[off : off + n])
        size -= n
        i += 1
    return out


def _digest(size: int, seed: int) -> str:
    h = hashlib.sha256()
    for c in _chunks(size, seed):
        h.update(c)
    return h.hexdigest()


async def send_all(sock: socket.socket, size: int, seed: int, *, half_close: bool = True) -> None:
    loop = asyncio.get_running_loop()
    for c in _chunks(size, seed):
        await loop.sock_sendall(sock, c)
    if half_close:
        sock.shutdown(socket.SHUT_WR)


async def recv_all(sock: socket.socket) -> tuple[int, str]:
    """Read to EOF; return the byte count and sha256."""
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    total = 0
    view = memoryview(bytearray(256 * 1024))
    while n := await loop.sock_recv_into(sock, view):
        h.update(view[:n])
        total += n
    return total, h.hexdigest()


@contextlib.asynccontextmanager
async def relayed_pair(
    mode: Literal["auto", "splice", "copy"] = "auto",
    family: int = socket.AF_UNIX,
) -> AsyncIterator[tuple[socket.socket, socket.socket, Relay, asyncio.Task[RelayStats]]]:
    """client <-> [relay] <-> server over real sockets; yields both ends and the relay."""
    client, ra = _pair(family)
    rb, server = _pair(family)
    for s in (client, server):
        s.setblocking(False)
    r = Relay(ra, rb, mode=mode)
    task = asyncio.create_task(r.run())
    try:
        yield client, server, r, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task
        client.close()
        server.close()


def _pair(family: int) -> tuple[socket.socket, socket.socket]:
    if family == socket.AF_UNIX:
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


SIZES = [0, 1, 64 * 1024, 4 * MiB, 256 * MiB]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a", "both"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
async def test_transfer_is_byte_exact(mode: str, direction: str, size: int) -> None:
    """Bytes arrive exactly (sha256 and count) in each direction and both at once."""
    async with relayed_pair(mode) as (client, server, _, task):  # type: ignore[arg-type]
        up = size if direction in ("a_to_b", "both") else 0
        down = size if direction in ("b_to_a", "both") else 0
        _, got_up, _, got_down = await asyncio.gather(
            send_all(client, up, 1),
            recv_all(server),
            send_all(server, down, 2),
            recv_all(client),
        )
        stats = await task
    assert got_up == (up, _digest(up, 1))
    assert got_down == (down, _digest(down, 2))
    assert (stats.bytes_a_to_b, stats.bytes_b_to_a) == (up, down)
    assert stats.ended == "eof"
    assert stats.mode == mode


@pytest.mark.parametrize("mode", MODES)
async def test_half_close_keeps_the_answer_flowing(mode: str) -> None:
    """A client that sends, shuts down its write side, still gets the whole answer."""
    loop = asyncio.get_running_loop()
    async with relayed_pair(mode) as (client, server, _, task):  # type: ignore[arg-type]
        # The client sends, then shuts down its write side.
        _, got = await asyncio.gather(send_all(client, 3 * MiB, 1), recv_all(server))
        assert got == (3 * MiB, _digest(3 * MiB, 1))
        # The server saw EOF, yet its answer still reaches the client.
        answer = asyncio.create_task(recv_all(client))
        await asyncio.sleep(0.05)
        assert not answer.done()
        await send_all(server, 5 * MiB, 2, half_close=False)
        server.close()
        assert await answer == (5 * MiB, _digest(5 * MiB, 2))
        stats = await task
        assert stats.ended == "eof"
        with pytest.raises(OSError):
            await loop.sock_sendall(client, b"x" * MiB)


async def _until_closed(sock: socket.socket) -> str:
    """Read and discard until the peer closes; say how (eof or reset)."""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, MiB):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


@pytest.mark.parametrize("mode", MODES)
async def test_reset_mid_transfer_ends_both_sides(mode: str) -> None:
    """A client that vanishes mid-download ends the relay and the server's side."""
    loop = asyncio.get_running_loop()
    async with relayed_pair(mode) as (client, server, _, task):  # type: ignore[arg-type]

        async def stream_forever() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    await loop.sock_sendall(server, _BLOCK)

        sender = asyncio.create_task(stream_forever())
        await loop.sock_recv(client, 1000)
        client.close()  # unread data queued: the relay sees a reset
        stats = await task
        await sender  # the server's writes fail once the relay closed its side
        assert stats.ended == "reset"
        assert stats.error is not None


@pytest.mark.parametrize("mode", MODES)
async def test_tcp_rst_ends_both_sides(mode: str) -> None:
    """An RST (SO_LINGER 0) from one side closes the other side promptly."""
    async with relayed_pair(mode, socket.AF_INET) as (client, server, _, task):  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"hello")
        assert await loop.sock_recv(server, 5) == b"hello"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert await _until_closed(server) in ("eof", "reset")
        stats = await task
        assert stats.ended == "reset"


@pytest.mark.parametrize("mode", MODES)
async def test_stalled_reader_bounds_memory(mode: str) -> None:
    """A reader that stops reading stalls the writer; the relay holds a bounded amount."""
    async with relayed_pair(mode) as (client, server, r, task):  # type: ignore[arg-type]
        accepted = 0
        quiet = 0
        chunk = memoryview(_BLOCK)[: 64 * 1024]
        # Push until the writer makes no progress for a while (it is blocked).
        while quiet < 20 and accepted < 256 * MiB:
            try:
                accepted += client.send(chunk)
                quiet = 0
            except BlockingIOError:
                quiet += 1
                await asyncio.sleep(0.01)
        assert accepted < 32 * MiB  # socket buffers + one pipe/buffer, not 256 MiB
        bound = COPY_BUFFER_SIZE if mode == "copy" else 4 * MiB
        assert r.buffered <= bound
        # Reading again lets everything through.
        client.shutdown(socket.SHUT_WR)
        got, _ = await recv_all(server)
        assert got == accepted
        server.shutdown(socket.SHUT_WR)
        assert (await task).ended == "eof"


@pytest.mark.parametrize("mode", MODES)
async def test_thousand_concurrent_relays(mode: str) -> None:
    """1,000 relays at once all deliver their bytes exactly, both ways."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1000 * 10 + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:

        async def one(i: int) -> None:
            async with relayed_pair(mode) as (client, server, _, task):  # type: ignore[arg-type]
                size = 16 * 1024 + i
                _, up, _, down = await asyncio.gather(
                    send_all(client, size, i),
                    recv_all(server),
                    send_all(server, size, i + 1),
                    recv_all(client),
                )
                assert up == (size, _digest(size, i))
                assert down == (size, _digest(size, i + 1))
                assert (await task).ended == "eof"

        await asyncio.gather(*(one(i) for i in range(1000)))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_closes_both_sockets(mode: str) -> None:
    """Cancelling a relay closes both of its sockets; both peers see the end."""
    async with relayed_pair(mode) as (client, server, r, task):  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"x")
        assert await loop.sock_recv(server, 1) == b"x"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert r.stats.ended == "cancelled"
        assert await _until_closed(client) == "eof"
        assert await _until_closed(server) == "eof"


async def test_stats_count_each_direction() -> None:
    """The stats report the bytes moved each way, the mode and how it ended."""
    async with relayed_pair("auto") as (client, server, _, task):
        await asyncio.gather(
            send_all(client, 3 * MiB + 5, 1),
            recv_all(server),
            send_all(server, 5, 2),
            recv_all(client),
        )
        stats = await task
    assert stats.bytes_a_to_b == 3 * MiB + 5
    assert stats.bytes_b_to_a == 5
    assert stats.mode == "splice"  # auto on AF_UNIX
    assert stats.ended == "eof"
    assert stats.duration > 0


async def test_auto_mode_copies_tcp() -> None:
    """auto picks plain copying for sockets outside AF_UNIX/AF_VSOCK."""
    async with relayed_pair("auto", socket.AF_INET) as (client, server, _, task):
        await asyncio.gather(send_all(client, MiB, 1), recv_all(server))
        server.shutdown(socket.SHUT_WR)
        assert await recv_all(client) == (0, _digest(0, 0))
        assert (await task).mode == "copy"


async def test_relay_function_closes_sockets() -> None:
    """relay() takes ownership: its two sockets are closed when it returns."""
    client, ra = socket.socketpair()
    rb, server = socket.socketpair()
    with client, server:
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        stats = await relay(ra, rb)
        assert stats.ended == "eof"
        assert ra.fileno() == -1
        assert rb.fileno() == -1


@pytest.mark.parametrize("mode", MODES)
def test_works_on_uvloop(mode: str) -> None:
    """The relay moves bytes exactly and half-closes on uvloop too."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with relayed_pair(mode) as (client, server, _, task):  # type: ignore[arg-type]
            _, got = await asyncio.gather(send_all(client, 8 * MiB, 1), recv_all(server))
            assert got == (8 * MiB, _digest(8 * MiB, 1))
            _, got = await asyncio.gather(send_all(server, 8 * MiB, 2), recv_all(client))
            assert got == (8 * MiB, _digest(8 * MiB, 2))
            assert (await task).ended == "eof"

    _run(uvloop.new_event_loop, main)


def _run(
    factory: Callable[[], asyncio.AbstractEventLoop], main: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


# -- real processes --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
async def test_relay_process_to_echo_process(tmp_path: Path, mode: str, use_uvloop: bool) -> None:
    """Through a relay process to an echo process: 64 MiB come back exactly after half-close."""
    echo_path = str(tmp_path / "echo.sock")
    relay_path = str(tmp_path / "relay.sock")
    args = ["relay", relay_path, echo_path, "--mode", mode] + (["--uvloop"] if use_uvloop else [])
    with peer_process("echo", echo_path), peer_process(*args):
        sock = await connect(UnixEndpoint(relay_path), timeout=10)
        with sock:
            size = 64 * MiB
            _, got = await asyncio.gather(send_all(sock, size, 3), recv_all(sock))
            assert got == (size, _digest(size, 3))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("mode", MODES)
async def test_relay_process_memory_stays_bounded(tmp_path: Path, mode: str) -> None:
    """A relay process facing a stalled reader neither grows its memory nor spins."""
    loop = asyncio.get_running_loop()
    sink_path = str(tmp_path / "sink.sock")
    relay_path = str(tmp_path / "relay.sock")
    async with await listen(UnixEndpoint(sink_path)) as sink:
        with peer_process("relay", relay_path, sink_path, "--mode", mode) as proc:
            client = await connect(UnixEndpoint(relay_path), timeout=10)
            stalled = await sink.accept()  # never read until the end
            with client, stalled:
                before = rss_bytes(proc.pid)
                accepted = 0
                quiet = 0
                chunk = memoryview(_BLOCK)[: 64 * 1024]
                while quiet < 20 and accepted < 256 * MiB:
                    try:
                        accepted += client.send(chunk)
                        quiet = 0
                    except BlockingIOError:
                        quiet += 1
                        await asyncio.sleep(0.01)
                grown = rss_bytes(proc.pid) - before
                assert accepted < 32 * MiB
                assert grown < 16 * MiB
                # While blocked the relay waits instead of busy-looping on a
                # readable source (a spin would burn the whole second).
                cpu0 = _cpu_seconds(proc.pid)
                await asyncio.sleep(1.0)
                assert _cpu_seconds(proc.pid) - cpu0 < 0.5
                client.shutdown(socket.SHUT_WR)
                stalled.setblocking(False)
                total = 0
                while data := await loop.sock_recv(stalled, MiB):
                    total += len(data)
                assert total == accepted


async def test_splice_works_when_pipes_cannot_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the per-user pipe quota (F_SETPIPE_SZ -> EPERM) splice still moves every byte."""
    import fcntl as real_fcntl  # noqa: PLC0415

    from socketforward import relay as relay_module  # noqa: PLC0415

    refused: list[int] = []

    def no_resize(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == getattr(real_fcntl, "F_SETPIPE_SZ", 1031):
            refused.append(fd)
            raise PermissionError(errno.EPERM, "pipe-user-pages-soft reached")
        return real_fcntl.fcntl(fd, cmd, arg)

    monkeypatch.setattr(relay_module, "fcntl", SimpleNamespace(fcntl=no_resize))
    async with relayed_pair("splice") as (client, server, _, task):
        _, got = await asyncio.gather(send_all(client, 4 * MiB, 5), recv_all(server))
        assert got == (4 * MiB, _digest(4 * MiB, 5))
        server.shutdown(socket.SHUT_WR)
        assert await recv_all(client) == (0, _digest(0, 0))
        stats = await task
    assert refused
    assert stats.mode == "splice"
    assert stats.ended == "eof"


async def test_started_relay_reports_through_on_done_and_closes_on_request() -> None:
    """A relay started without a task of its own carries bytes both ways, tells
    on_done how it ended, and close() ends it at once with both sockets closed."""
    loop = asyncio.get_running_loop()
    outer_a, inner_a = socket.socketpair()
    inner_b, outer_b = socket.socketpair()
    ended: list[RelayStats] = []
    with outer_a, outer_b:
        for sock in (outer_a, outer_b):
            sock.setblocking(False)
        running = Relay(inner_a, inner_b, on_done=ended.append)
        running.start()
        await loop.sock_sendall(outer_a, b"ping")
        assert await loop.sock_recv(outer_b, 4) == b"ping"
        await loop.sock_sendall(outer_b, b"pong!")
        assert await loop.sock_recv(outer_a, 5) == b"pong!"
        assert ended == []
        running.close()
        assert [(s.ended, s.bytes_a_to_b, s.bytes_b_to_a) for s in ended] == [("cancelled", 4, 5)]
        assert inner_a.fileno() == -1 and inner_b.fileno() == -1
        assert await loop.sock_recv(outer_a, 1) == b""  # the peer sees the close


WMEM_MAX = int(Path("/proc/sys/net/core/wmem_max").read_text())


@pytest.mark.parametrize("mode", MODES)
async def test_send_buffer_grows_for_bulk_transfers_only(mode: str) -> None:
    """A socket the relay writes into gets a bigger send buffer once it fills up
    (a bulk transfer: fewer wake-ups per byte); a short exchange leaves the
    kernel default. Either way every byte arrives."""
    client, ra = socket.socketpair()
    rb, server = socket.socketpair()
    default = rb.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    for s in (client, server):
        s.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(Relay(ra, rb, mode=mode, sndbuf=4 * MiB).run())  # type: ignore[arg-type]
    try:
        await loop.sock_sendall(client, b"ping")
        assert await loop.sock_recv(server, 4) == b"ping"
        await loop.sock_sendall(server, b"pong")
        assert await loop.sock_recv(client, 4) == b"pong"
        assert rb.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default
        assert ra.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default
        sender = asyncio.create_task(send_all(client, 64 * MiB, seed=3))
        await asyncio.sleep(0.2)  # the server reads nothing yet: rb fills up
        # The kernel doubles what it is given and caps it at wmem_max.
        assert rb.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * min(4 * MiB, WMEM_MAX)
        assert await recv_all(server) == (64 * MiB, _digest(64 * MiB, seed=3))
        await sender
        assert ra.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default  # never full
        server.shutdown(socket.SHUT_WR)
        assert (await task).ended == "eof"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task
        client.close()
        server.close()


async def test_an_established_relay_survives_running_out_of_pipes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When no pipe can be opened (EMFILE) as bytes start to flow, the relay
    copies through a buffer instead: every byte arrives, nothing is cut."""
    from socketforward import relay as relay_module  # noqa: PLC0415

    def no_pipe(size: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(relay_module, "_open_pipe", no_pipe)
    async with relayed_pair("splice") as (client, server, _, task):
        _, got = await asyncio.gather(send_all(client, 4 * MiB, 7), recv_all(server))
        assert got == (4 * MiB, _digest(4 * MiB, 7))
        server.shutdown(socket.SHUT_WR)
        assert await recv_all(client) == (0, _digest(0, 0))
        stats = await task
    assert stats.ended == "eof"
    assert stats.bytes_a_to_b == 4 * MiB
    assert stats.pipe_shortages >= 1
