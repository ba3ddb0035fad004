"""Ends of data-stream directions out of band (docs/protocol.md 5.5): the relay's
side (announce instead of a shutdown, the far side's count ends a direction)
and the registry that routes counts to relays by stream id."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator

import pytest

from socketforward.api import socketforward_pb2 as pb
from socketforward.ends import EndRegistry
from socketforward.relay import Relay, RelayStats
from tests.test_relay import MODES, MiB, _digest, recv_all, send_all


class Peer:
    """One relay between *client* (its a side: the local socket) and *stream*
    (its b side: the data stream, whose far end the test plays)."""

    def __init__(self, client: socket.socket, stream: socket.socket, relay: Relay) -> None:
        self.client, self.stream, self.relay = client, stream, relay
        self.announced: list[int] = []
        self.heard = asyncio.Event()
        """Set at the first announce."""
        self.done: asyncio.Future[RelayStats] = asyncio.get_running_loop().create_future()
        self.sink: Sink | None = None


class Sink:
    """The far side's channel: records what a relay announces."""

    def __init__(self, up: bool) -> None:
        self.up = up
        self.peers: dict[Relay, Peer] = {}

    def announce(self, relay: Relay, total: int) -> bool:
        peer = self.peers[relay]
        peer.announced.append(total)
        peer.heard.set()
        return self.up


@contextlib.asynccontextmanager
async def relay_with_ends(
    mode: str,
    *,
    channel_up: bool = True,
    end_timeout: float = 30.0,
    ends_id: str = "s-1",
    channel: int = 1,
    later: bool = False,
) -> AsyncIterator[Peer]:
    """*later*: the relay starts not knowing how its ends travel (settle_ends)."""
    client, ra = socket.socketpair()
    rb, stream = socket.socketpair()
    for s in (client, stream):
        s.setblocking(False)
    holder: list[Peer] = []
    sink = Sink(channel_up)

    def done(stats: RelayStats) -> None:
        holder[0].done.set_result(stats)

    relay = Relay(
        ra,
        rb,
        mode=mode,  # type: ignore[arg-type]
        ends=None if later else sink,
        ends_id=ends_id,
        ends_channel=0 if later else channel,
        on_done=done,
        end_timeout=end_timeout,
        ends_later=later,
    )
    sink.peers[relay] = Peer(client, stream, relay)
    peer = sink.peers[relay]
    peer.sink = sink
    holder.append(peer)
    relay.start()
    try:
        yield peer
    finally:
        relay.close()
        client.close()
        stream.close()


async def nothing_more(sock: socket.socket, wait: float = 0.2) -> bool:
    """True when *sock* has neither bytes nor EOF to read after *wait* seconds."""
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), wait)
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("mode", MODES)
async def test_local_eof_is_announced_not_shut_down(mode: str) -> None:
    """The local side sends 1 MiB and shuts down its write side: the far side
    hears the exact count out of band, the data stream stays open both ways,
    and the answer still flows back."""
    async with relay_with_ends(mode) as peer:
        _, got = await asyncio.gather(send_all(peer.client, MiB, 1), _read(peer.stream, MiB))
        assert got == _digest(MiB, 1)
        await asyncio.wait_for(peer.heard.wait(), 5)
        assert peer.announced == [MiB]
        assert await nothing_more(peer.stream), "the data stream was half-closed"
        answer = asyncio.create_task(recv_all(peer.client))
        await send_all(peer.stream, 2 * MiB, 2, half_close=False)
        peer.relay.peer_end(2 * MiB)
        assert await answer == (2 * MiB, _digest(2 * MiB, 2))
        stats = await peer.done
    assert (stats.ended, stats.bytes_a_to_b, stats.bytes_b_to_a) == ("eof", MiB, 2 * MiB)


@pytest.mark.parametrize("mode", MODES)
async def test_an_end_before_the_answer_waits_for_it_then_travels_out_of_band(
    mode: str,
) -> None:
    """A connection the guest relays before the host's answer (docs/protocol.md
    5.6) ends its direction first: nothing is announced and the data stream is
    not shut down until the answer says how; then the count goes out of band."""
    async with relay_with_ends(mode, later=True) as peer:
        _, got = await asyncio.gather(send_all(peer.client, MiB, 1), _read(peer.stream, MiB))
        assert got == _digest(MiB, 1)
        assert await nothing_more(peer.stream), "the end did not wait for the answer"
        assert peer.announced == []
        assert peer.sink is not None
        peer.relay.settle_ends(peer.sink, 1)
        await asyncio.wait_for(peer.heard.wait(), 5)
        assert peer.announced == [MiB]
        assert await nothing_more(peer.stream), "the data stream was half-closed"


@pytest.mark.parametrize("mode", MODES)
async def test_an_end_before_an_answer_without_a_channel_is_a_shutdown(mode: str) -> None:
    """Held the same way, the end becomes a shutdown of the data stream when the
    answer names no channel."""
    async with relay_with_ends(mode, later=True) as peer:
        _, got = await asyncio.gather(send_all(peer.client, MiB, 1), _read(peer.stream, MiB))
        assert got == _digest(MiB, 1)
        assert await nothing_more(peer.stream)
        peer.relay.settle_ends(None)
        assert await asyncio.wait_for(recv_all(peer.stream), 5) == (0, _digest(0, 0))
        assert peer.announced == []


@pytest.mark.parametrize("mode", MODES)
async def test_no_channel_falls_back_to_a_shutdown(mode: str) -> None:
    """When the count cannot be sent, the data stream is shut down as before."""
    async with relay_with_ends(mode, channel_up=False) as peer:
        _, got = await asyncio.gather(send_all(peer.client, MiB, 1), recv_all(peer.stream))
        assert got == (MiB, _digest(MiB, 1))  # read to EOF: the shutdown came
        assert peer.announced == [MiB]


@pytest.mark.parametrize("mode", MODES)
async def test_far_count_ends_the_direction_at_exactly_that_many(mode: str) -> None:
    """Told the count first, the relay passes exactly that many bytes and then
    EOF; what the data stream carries beyond it is not relayed."""
    async with relay_with_ends(mode) as peer:
        peer.relay.peer_end(3 * MiB)
        answer = asyncio.create_task(recv_all(peer.client))
        await send_all(peer.stream, 3 * MiB, 4, half_close=False)
        await peer.relay.loop.sock_sendall(peer.stream, b"not announced")
        assert await answer == (3 * MiB, _digest(3 * MiB, 4))
        # The other direction still works after the EOF.
        await send_all(peer.client, 1000, 5, half_close=False)
        assert await _read(peer.stream, 1000) == _digest(1000, 5)


@pytest.mark.parametrize("mode", MODES)
async def test_a_count_below_what_came_ends_the_relay(mode: str) -> None:
    """A far side that announces fewer bytes than it sent breaks the connection:
    both sockets close and the stats say why."""
    async with relay_with_ends(mode) as peer:
        await send_all(peer.stream, 4096, 6, half_close=False)
        assert await _read(peer.client, 4096) == _digest(4096, 6)
        peer.relay.peer_end(100)
        stats = await peer.done
        assert stats.ended == "error" and stats.end_mismatch
        assert await recv_all(peer.client) == (0, _digest(0, 0))  # closed


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_that_ends_short_of_the_count_ends_the_relay(mode: str) -> None:
    """The data stream closes before the announced bytes came: an error, not EOF."""
    async with relay_with_ends(mode) as peer:
        peer.relay.peer_end(MiB)
        await send_all(peer.stream, 1000, 7, half_close=False)
        peer.stream.close()
        stats = await peer.done
        assert stats.ended == "error" and stats.end_mismatch


async def test_announced_bytes_that_never_come_time_out() -> None:
    """A far side that announces more than it sends and goes quiet is ended
    after end_timeout instead of holding the connection forever."""
    async with relay_with_ends("splice", end_timeout=0.2) as peer:
        peer.relay.peer_end(MiB)
        await send_all(peer.stream, 1000, 8, half_close=False)
        stats = await asyncio.wait_for(peer.done, 10)
        assert stats.ended == "error" and stats.end_mismatch
        assert "nothing for 0.2s" in str(stats.error)


async def test_a_slow_local_reader_is_not_a_timeout() -> None:
    """While the local side is slow to read, the missing bytes are not the far
    side's fault: the relay waits past end_timeout and delivers them all."""
    size = 16 * MiB  # more than the socket buffers hold
    async with relay_with_ends("splice", end_timeout=0.2) as peer:
        peer.relay.peer_end(size)
        sender = asyncio.create_task(send_all(peer.stream, size, 9, half_close=False))
        await asyncio.sleep(0.8)  # four periods with the client not reading
        assert not peer.done.done()
        assert await recv_all(peer.client) == (size, _digest(size, 9))
        await sender


async def test_end_in_band_shuts_the_stream_down_after_all() -> None:
    """An announced end whose channel was lost becomes a shutdown of the stream."""
    async with relay_with_ends("splice") as peer:
        await send_all(peer.client, 500, 10)
        await asyncio.wait_for(peer.heard.wait(), 5)
        assert await _read(peer.stream, 500) == _digest(500, 10)
        assert await nothing_more(peer.stream)
        peer.relay.end_in_band()
        assert await recv_all(peer.stream) == (0, _digest(0, 0))  # EOF now


# -- the registry ------------------------------------------------------------------


async def test_registry_hands_an_early_count_to_its_relay() -> None:
    """The guest may read the host's count before it starts that relay: the
    count waits for it."""
    registry = EndRegistry(_no_call, early_limit=4)
    async with relay_with_ends("copy", ends_id="s-1") as peer:
        assert not registry.received("s-1", 2000)
        answer = asyncio.create_task(recv_all(peer.client))
        registry.add(peer.relay)
        await send_all(peer.stream, 2000, 11, half_close=False)
        assert await answer == (2000, _digest(2000, 11))


def test_registry_bounds_what_it_keeps_for_no_relay() -> None:
    """Counts for ids that never get a relay cost bounded memory; the host keeps none."""
    guest = EndRegistry(_no_call, early_limit=3)
    for i in range(10):
        guest.received(f"s-{i}", i)
    assert guest.strays == 7
    host = EndRegistry(_no_call, early_limit=0)
    assert not host.received("s-1", 1)
    assert host.strays == 1


async def test_registry_falls_back_only_for_the_lost_channel() -> None:
    """Losing one StreamEnds call shuts down the streams of its relays that
    announced; a relay on another channel is left alone."""
    registry = EndRegistry(_no_call)
    async with (
        relay_with_ends("copy", ends_id="lost", channel=1) as lost,
        relay_with_ends("copy", ends_id="kept", channel=2) as kept,
    ):
        registry.add(lost.relay)
        registry.add(kept.relay)
        for peer in (lost, kept):
            await send_all(peer.client, 10, 12)
            await asyncio.wait_for(peer.heard.wait(), 5)
            assert await _read(peer.stream, 10) == _digest(10, 12)
        assert registry.channel_lost(1) == 1
        assert await recv_all(lost.stream) == (0, _digest(0, 0))
        assert await nothing_more(kept.stream)
        registry.discard(lost.relay)
        assert "lost" not in registry and len(registry) == 1


# -- helpers -----------------------------------------------------------------------


def _no_call(channel: int) -> None:
    return None


async def _read(sock: socket.socket, size: int) -> str:
    """Read exactly *size* bytes; their sha256."""
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    left = size
    while left:
        data = await loop.sock_recv(sock, min(left, 1 << 16))
        assert data, f"EOF with {left} bytes to go"
        h.update(data)
        left -= len(data)
    return h.hexdigest()


class _Call:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def send_nowait(self, message: pb.StreamEnd, /) -> None:
        self.sent.append((message.stream_id, message.bytes))


async def test_registry_sends_on_the_relays_channel_while_it_is_open() -> None:
    """A relay's end goes on the call of its own channel; once that call is
    gone the registry says so and the relay shuts its data stream down."""
    call = _Call()
    open_calls: dict[int, _Call] = {3: call}
    registry = EndRegistry(open_calls.get)
    async with relay_with_ends("copy", ends_id="s-9", channel=3) as peer:
        assert registry.announce(peer.relay, 1234)
        assert call.sent == [("s-9", 1234)]
        del open_calls[3]
        assert not registry.announce(peer.relay, 1234)
