"""The host's side of ends out of band (docs/protocol.md 5.5), against a guest
played by a real ttrpc server: negotiation, both directions, a hostile VM."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import pytest

from tests.host.fake_guest import FakeGuest, recv_all, recv_exactly
from tests.host.host_env import host_with_guest, wait_until

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


class Service:
    """Host service handlers that remember what they read."""

    def __init__(self) -> None:
        self.read = 0
        self.heard: list[int] = []
        """Bytes read to EOF, per connection."""

    async def speak_then_listen(self, sock: socket.socket) -> None:
        """Send 1 MiB, shut down the write side, then read to EOF."""
        await asyncio.get_running_loop().sock_sendall(sock, b"s" * MIB)
        sock.shutdown(socket.SHUT_WR)
        await self.listen(sock)

    async def listen(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        total = 0
        while data := await loop.sock_recv(sock, 1 << 16):
            total += len(data)
            self.read += len(data)
        self.heard.append(total)


async def test_results_name_the_channel_the_guest_offered(short_tmp: Path) -> None:
    """With a guest that serves StreamEnds, every success names its channel; a
    stream id still in use by a running relay gets none (the VM picks ids)."""
    async with host_with_guest(short_tmp, guest_ends=True) as (_env, _, guest, call):
        first = await call.connect("s-1", "fwd-a")
        assert (first.error, first.ends_channel) == ("", FakeGuest.ENDS_CHANNEL)
        again = await call.connect("s-1", "fwd-a")
        assert (again.error, again.ends_channel) == ("", 0)
        guest.close_claimed()


async def test_a_guest_without_stream_ends_gets_shutdowns(short_tmp: Path) -> None:
    """A guest that answers StreamEnds UNIMPLEMENTED gets no channel, and a
    half-close reaches it as a shutdown of the data stream, as before."""
    service = Service()
    async with host_with_guest(short_tmp, service.speak_then_listen) as (_env, _, guest, call):
        result = await call.connect("s-1", "fwd-a")
        assert (result.error, result.ends_channel) == ("", 0)
        vm_side = guest.claimed.pop("s-1")
        assert vm_side is not None
        with vm_side:
            assert len(await recv_all(vm_side)) == MIB  # EOF on the data stream
        assert guest.ends.empty()


async def test_host_side_eof_travels_as_a_count(short_tmp: Path) -> None:
    """The host service half-closes after 1 MiB: the guest hears the exact count
    on StreamEnds, the data stream stays open both ways, and what the VM sends
    back reaches the service, which sees EOF when the VM's count arrives."""
    service = Service()
    async with host_with_guest(short_tmp, service.speak_then_listen, guest_ends=True) as (
        env,
        _,
        guest,
        call,
    ):
        assert (await call.connect("s-1", "fwd-a")).ends_channel == FakeGuest.ENDS_CHANNEL
        vm_side = guest.claimed.pop("s-1")
        assert vm_side is not None
        with vm_side:
            assert len(await recv_exactly(vm_side, MIB)) == MIB
            end = await guest.next_end()
            assert (end.stream_id, end.bytes) == ("s-1", MIB)
            loop = asyncio.get_running_loop()
            with pytest.raises(TimeoutError):  # no EOF on the data stream
                await asyncio.wait_for(loop.sock_recv(vm_side, 1), 0.2)
            reply = os.urandom(3000)
            await loop.sock_sendall(vm_side, reply)
            await guest.send_end("s-1", len(reply))
            await wait_until(lambda: service.heard == [len(reply)])
            assert await recv_all(vm_side) == b""  # both done: the host closed it
        await wait_until(lambda: env.forwarder.stats()["fwd-a"].active == 0)
        stats = env.forwarder.stats()["fwd-a"]
        assert (stats.bytes_to_vm, stats.bytes_to_host, stats.failed) == (MIB, 3000, {})


async def test_a_vm_count_that_does_not_match_ends_only_that_connection(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VM that announces fewer bytes than it sent has that connection closed
    (logged once, rate-limited); the forward keeps serving."""
    caplog.set_level(logging.WARNING, logger="socketforward.host")
    service = Service()
    async with host_with_guest(short_tmp, service.listen, guest_ends=True) as (
        _env,
        _,
        guest,
        call,
    ):
        assert (await call.connect("s-1", "fwd-a")).ends_channel
        vm_side = guest.claimed.pop("s-1")
        assert vm_side is not None
        with vm_side:
            await asyncio.get_running_loop().sock_sendall(vm_side, b"x" * 5000)
            await wait_until(lambda: service.read == 5000)
            await guest.send_end("s-1", 10)
            assert await recv_all(vm_side) == b""  # closed, no answer
        assert "connection ended on a bad stream end stream_id=s-1" in caplog.text
        assert (await call.connect("s-2", "fwd-a")).error == ""
        guest.close_claimed()


async def test_stray_counts_from_the_vm_are_dropped_and_rate_limited(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VM that floods StreamEnd messages for ids it never had: all dropped,
    at most one minute's worth of lines logged, the host keeps serving."""
    caplog.set_level(logging.WARNING, logger="socketforward.host")
    async with host_with_guest(short_tmp, guest_ends=True) as (env, _, guest, call):
        for i in range(500):
            await guest.send_end(f"nobody-{i}", i)
        await wait_until(lambda: env.forwarder.stray_ends == 500)
        lines = [r for r in caplog.records if "stream end for no relay" in r.getMessage()]
        assert 1 <= len(lines) <= 20
        assert (await call.connect("s-1", "fwd-a")).error == ""
        guest.close_claimed()
