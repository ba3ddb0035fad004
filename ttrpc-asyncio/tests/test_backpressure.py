"""Flow control toward a peer that does not read: ``Client.write_buffer_size``
tells how much is queued for it, ``Client.set_write_buffer_limits`` sets the
marks, ``await Client.drain()`` waits until the queue is back at the low one.
Real socket pairs, on asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from google.protobuf import wrappers_pb2

import ttrpc_asyncio as ttrpc
from ttrpc_asyncio._fd_transport import FdTransport

pytestmark = pytest.mark.timeout(60)

LOOPS = ["asyncio", "uvloop"]
HIGH = 256 * 1024
LOW = 32 * 1024
CHUNK = 16 * 1024

Bytes = wrappers_pb2.BytesValue


def run(loop_kind: str, main: Callable[[], Awaitable[None]]) -> None:
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())  # type: ignore[arg-type]


async def open_stream(client: ttrpc.Client) -> ttrpc.ClientStream[Bytes, Bytes]:
    return await client.stream(
        "test.Sink", "Put", Bytes, client_streaming=True, server_streaming=True
    )


def fill(stream: ttrpc.ClientStream[Bytes, Bytes], client: ttrpc.Client) -> int:
    """send_nowait until the queue is past the high mark; returns the messages sent."""
    sent = 0
    while client.write_buffer_size <= HIGH:
        stream.send_nowait(Bytes(value=bytes([sent % 256]) * CHUNK))
        sent += 1
        assert sent < 10_000, "the queue never grew: is the peer reading?"
    return sent


async def read_frames(peer: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """Read *count* ttrpc frames (after the request that opened the stream)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    frames: list[tuple[int, bytes]] = []
    while len(frames) < count + 1:
        chunk = await loop.sock_recv(peer, 1 << 16)
        assert chunk, "connection closed early"
        buf += chunk
        while len(buf) >= 10:
            length, _, type_, _ = struct.unpack(">IIBB", buf[:10])
            if len(buf) < 10 + length:
                break
            frames.append((type_, bytes(buf[10 : 10 + length])))
            del buf[: 10 + length]
    return frames[1:]


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_queue_toward_a_peer_that_does_not_read_is_measured_and_drained(
    loop_kind: str,
) -> None:
    """Messages sent with send_nowait to a server that does not read show up in
    write_buffer_size; drain() waits while the server reads nothing (a caller
    can stop producing instead of buffering without bound) and returns once it
    has read the queue down to the low mark; every message arrives, in order."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        with peer:
            async with await ttrpc.Client.connect(ours) as client:
                client.set_write_buffer_limits(HIGH, LOW)
                assert client.write_buffer_size == 0
                stream = await open_stream(client)
                sent = fill(stream, client)
                assert HIGH < client.write_buffer_size <= HIGH + CHUNK + 64
                draining = asyncio.ensure_future(client.drain())
                done, _ = await asyncio.wait({draining}, timeout=0.05)
                assert not done, "drain() returned while the peer read nothing"
                assert client.write_buffer_size > HIGH
                reading = asyncio.ensure_future(read_frames(peer, sent))
                await asyncio.wait_for(draining, 10)
                assert client.write_buffer_size <= LOW
                frames = await asyncio.wait_for(reading, 10)
                assert client.write_buffer_size == 0
                assert [Bytes.FromString(data).value[:1] for _, data in frames] == [
                    bytes([i % 256]) for i in range(sent)
                ]
                await stream.aclose()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_drain_returns_at_once_below_the_high_mark(loop_kind: str) -> None:
    """A queue that never went past the high mark does not hold drain() up,
    even though the peer is not reading (what asyncio's drain does too)."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        with peer:
            async with await ttrpc.Client.connect(ours) as client:
                client.set_write_buffer_limits(HIGH, LOW)
                stream = await open_stream(client)
                stream.send_nowait(Bytes(value=b"x" * CHUNK))
                await asyncio.wait_for(client.drain(), 1)
                assert client.write_buffer_size <= HIGH
                await stream.aclose()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_drain_fails_when_the_peer_goes_away_without_reading(loop_kind: str) -> None:
    """A caller waiting in drain() is not stuck when the server disappears
    with the queue unread: drain() raises UNAVAILABLE and the queue is gone."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        async with await ttrpc.Client.connect(ours) as client:
            client.set_write_buffer_limits(HIGH, LOW)
            stream = await open_stream(client)
            fill(stream, client)
            draining = asyncio.ensure_future(client.drain())
            await asyncio.sleep(0)
            peer.close()
            with pytest.raises(ttrpc.TtrpcError) as caught:
                await asyncio.wait_for(draining, 10)
            assert caught.value.code == ttrpc.Code.UNAVAILABLE
            assert client.write_buffer_size == 0
            with pytest.raises(ttrpc.TtrpcError):
                await client.drain()

    run(loop_kind, main)


class PauseRecorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_vsock_transport_applies_new_marks_at_once(loop_kind: str) -> None:
    """The transport used for vsock takes the marks as asyncio's do: lowering
    the high mark below what is already queued pauses writers at once, low
    defaults to a quarter of high, and marks out of order are refused."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        with peer:
            proto = PauseRecorder()
            transport = FdTransport(asyncio.get_running_loop(), ours, proto)
            transport.set_write_buffer_limits(high=16 << 20)
            assert transport.get_write_buffer_limits() == (4 << 20, 16 << 20)
            transport.write(b"x" * (4 << 20))  # more than the socket buffer takes
            queued = transport.get_write_buffer_size()
            assert 0 < queued < 16 << 20
            assert proto.events == []
            transport.set_write_buffer_limits(high=queued - 1)
            assert proto.events == ["pause"]
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(high=10, low=20)
            transport.abort()
            await asyncio.wait_for(proto.lost, 5)

    run(loop_kind, main)
