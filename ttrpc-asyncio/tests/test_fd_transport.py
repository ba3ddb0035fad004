"""FdTransport, the transport ttrpc uses for AF_VSOCK (which uvloop's own
transports refuse), on real socket pairs under asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from ttrpc_asyncio._fd_transport import HIGH_WATER, FdTransport

LOOPS = ["asyncio", "uvloop"]


def run(loop_kind: str, main: Callable[[], Awaitable[None]]) -> None:
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())  # type: ignore[arg-type]


class Recorder(asyncio.Protocol):
    """Keeps what the transport reports, in order."""

    def __init__(self, *, keep_open_on_eof: bool = False) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.keep_open_on_eof = keep_open_on_eof
        self.got_data = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got_data.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_slow_reader_pauses_the_writer_and_gets_every_byte(loop_kind: str) -> None:
    """8 MiB written to a peer that is not reading: the protocol is told to
    pause, then to resume as the peer catches up; the bytes arrive in order and
    close() after the writes still delivers all of them, then EOF."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        proto = Recorder()
        transport = FdTransport(asyncio.get_running_loop(), ours, proto)
        payload = os.urandom(8 << 20)
        for i in range(0, len(payload), 1 << 20):
            transport.write(payload[i : i + (1 << 20)])
        assert proto.events == ["made", "pause"]
        assert transport.get_write_buffer_size() > HIGH_WATER
        transport.close()
        with peer:
            got = await asyncio.wait_for(read_all(peer), 30)
        assert got == payload
        assert await asyncio.wait_for(proto.lost, 5) is None
        assert proto.events == ["made", "pause", "resume", "lost"]

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_data_in_and_peer_eof_closes_once(loop_kind: str) -> None:
    """What the peer sends arrives; its EOF reaches eof_received, and a protocol
    that does not keep the connection gets connection_lost(None) exactly once."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        proto = Recorder()
        FdTransport(asyncio.get_running_loop(), ours, proto)
        with peer:
            peer.sendall(b"hello")
            peer.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(proto.lost, 5) is None
        assert bytes(proto.data) == b"hello"
        assert proto.events == ["made", "eof", "lost"]
        assert ours.fileno() == -1  # the transport closed its socket

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_pause_reading_holds_data_back_until_resumed(loop_kind: str) -> None:
    """While reading is paused nothing is delivered; after resume it all is."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        proto = Recorder()
        transport = FdTransport(asyncio.get_running_loop(), ours, proto)
        with peer:
            transport.pause_reading()
            assert not transport.is_reading()
            peer.sendall(b"held")
            await asyncio.sleep(0.05)
            assert proto.data == b""
            transport.resume_reading()
            await asyncio.wait_for(proto.got_data.wait(), 5)
            assert proto.data == b"held"
            transport.close()
            await asyncio.wait_for(proto.lost, 5)

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_abort_drops_the_buffer_and_a_reset_peer_is_reported(loop_kind: str) -> None:
    """abort() closes at once without writing what is buffered; writing to a
    peer that went away ends the connection with the error, not silently."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        proto = Recorder()
        transport = FdTransport(loop, ours, proto)
        transport.write(b"x" * (4 << 20))
        transport.abort()
        assert transport.is_closing()
        assert await asyncio.wait_for(proto.lost, 5) is None
        peer.setblocking(False)
        with peer:
            assert len(await asyncio.wait_for(read_all(peer), 5)) < 4 << 20

        ours, peer = socket.socketpair()
        proto = Recorder(keep_open_on_eof=True)
        transport = FdTransport(loop, ours, proto)
        peer.close()
        await asyncio.sleep(0.05)
        transport.write(b"after the peer left")
        exc = await asyncio.wait_for(proto.lost, 5)
        assert isinstance(exc, OSError)

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_extra_info_outlives_the_socket(loop_kind: str) -> None:
    """The socket and its addresses are there through get_extra_info, also
    after the connection is gone (as asyncio's transports keep them)."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        proto = Recorder()
        transport = FdTransport(asyncio.get_running_loop(), ours, proto)
        assert transport.get_extra_info("socket") is ours
        assert transport.get_extra_info("peername") == ours.getpeername()
        peer.close()
        await asyncio.wait_for(proto.lost, 5)
        assert transport.get_extra_info("peername") is not None
        assert transport.get_extra_info("nothing", "default") == "default"

    run(loop_kind, main)
