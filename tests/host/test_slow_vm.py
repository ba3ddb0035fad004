"""A VM that stops reading its RPC socket cannot make the host's memory grow:
the host stops reading its ConnectRequests once a bounded amount waits for it,
drops its RPC connection when it still does not read, and serves the guest
that dials next."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from socketforward import transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.host import Forwarder
from tests.host.fake_guest import (
    FakeGuest,
    exchange,
    guest_dialing,
    reverse_after_eof,
    unix_service,
)
from tests.host.host_env import fwd, running_host, wait_until
from ttrpc_asyncio.proto import ttrpc_pb2

pytestmark = pytest.mark.timeout(60)

MARK = 64 * 1024
READ_TIMEOUT = 2.5  # past ttrpc's 1 s rule for a stream whose queue stays full
BIG_ID = "x" * 1_000_000
LONG_FORWARD_ID = "\U0001f600" * 300  # echoed cut at 256 characters: about 1 KiB
RESULT_MAX = 1400  # the largest ConnectResult frame the host sends (a long unknown forward_id)

_HEADER = struct.Struct(">IIBB")  # length, stream id, type, flags
_REQUEST, _RESPONSE, _DATA = 1, 2, 3


class FloodingVM:
    """A guest agent written by hand on a raw socket: it answers Bind, takes
    the host's Accept call, then floods ConnectRequests on it and never reads
    its socket again. ``sent`` counts the requests the kernel took."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0

    async def _frame(self) -> tuple[int, int, bytes]:
        loop = asyncio.get_running_loop()
        header = b""
        while len(header) < _HEADER.size:
            chunk = await loop.sock_recv(self.sock, _HEADER.size - len(header))
            assert chunk, "host closed the rpc connection"
            header += chunk
        length, stream_id, type_, _ = _HEADER.unpack(header)
        data = b""
        while len(data) < length:
            chunk = await loop.sock_recv(self.sock, length - len(data))
            assert chunk, "host closed the rpc connection"
            data += chunk
        return stream_id, type_, data

    async def accept_call(self) -> int:
        """Serve the host's calls until it opens Accept; its stream id."""
        loop = asyncio.get_running_loop()
        while True:
            stream_id, type_, data = await self._frame()
            if type_ != _REQUEST:
                continue
            method = ttrpc_pb2.Request.FromString(data).method
            if method == "Accept":
                return stream_id
            # Bind (and anything else unary): an OK Response, empty payload.
            await loop.sock_sendall(self.sock, _HEADER.pack(0, stream_id, _RESPONSE, 0))

    async def flood(self, accept_id: int) -> None:
        """ConnectRequests for forwards the host does not have: every fourth
        with a 1 MB stream_id, the others with a long forward_id the host echoes."""
        loop = asyncio.get_running_loop()
        for i in range(100_000):
            if i % 4 == 0:
                request = pb.ConnectRequest(stream_id=BIG_ID, forward_id=f"unknown-{i}")
            else:
                request = pb.ConnectRequest(stream_id=f"s-{i}", forward_id=LONG_FORWARD_ID)
            data = request.SerializeToString()
            await loop.sock_sendall(self.sock, _HEADER.pack(len(data), accept_id, _DATA, 0) + data)
            self.sent += 1


@contextlib.asynccontextmanager
async def flooding_vm(rpc: transport.Endpoint) -> AsyncIterator[tuple[FloodingVM, int]]:
    """A FloodingVM dialed to the host at *rpc*, past Bind, and the id of the
    host's Accept call."""
    sock = await transport.connect(rpc, timeout=10)
    with sock:
        vm = FloodingVM(sock)
        async with asyncio.timeout(10):
            accept_id = await vm.accept_call()
        yield vm, accept_id


async def test_vm_that_stops_reading_is_bounded_then_dropped_and_next_guest_served(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VM floods ConnectRequests (1 MB stream ids, unknown forwards) and never
    reads the answers. What the host holds for it stays under the configured
    mark (plus one answer: a 1 MB id is never echoed); the host then reads no
    more of its socket, so the VM's own writes block; after the configured time the
    host drops that RPC connection with one log line, and a guest that dials
    next is served."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    caplog.set_level(logging.WARNING, logger="ttrpc_asyncio")
    forward = fwd(short_tmp, "a")
    async with (
        unix_service(Path(forward.host_path), reverse_after_eof),
        running_host(
            short_tmp, [forward], max_queued_to_vm=MARK, vm_read_timeout=READ_TIMEOUT
        ) as env,
    ):
        forwarder: Forwarder = env.forwarder
        async with flooding_vm(env.rpc) as (vm, accept_id):
            flooding = asyncio.ensure_future(vm.flood(accept_id))
            most = 0
            read_when_paused: int | None = None
            sent_when_paused = 0
            async with asyncio.timeout(30):
                while forwarder.unread_drops == 0:
                    queued = forwarder.queued_to_vm
                    most = max(most, queued)
                    if queued > MARK and read_when_paused is None:
                        read_when_paused = forwarder.unknown_requests
                        sent_when_paused = vm.sent
                    await asyncio.sleep(0)
            assert read_when_paused is not None, "the host never stopped reading"
            assert MARK < most <= MARK + RESULT_MAX
            # Paused: no request read, and the VM's writes soon blocked.
            assert forwarder.unknown_requests == read_when_paused
            assert vm.sent < sent_when_paused + 200
            with pytest.raises(OSError):
                await asyncio.wait_for(flooding, 10)  # the host hung up
        dropped = [
            r for r in caplog.records if "vm not reading its rpc connection" in r.getMessage()
        ]
        assert len(dropped) == 1 and dropped[0].levelno == logging.WARNING
        # The host read nothing while paused: no stream was closed for a full
        # queue and its frames then read and thrown away (a CPU burn for the VM).
        assert "receive queue full" not in caplog.text
        assert forwarder.queued_to_vm == 0

        guest = FakeGuest(registry=env.registry)
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            assert (await call.connect("s-ok", "fwd-a")).error == ""
            vm_side = guest.claimed.pop("s-ok")
            assert vm_side is not None
            with vm_side:
                assert await exchange(vm_side, b"still served") == b"devres llits"
            await wait_until(lambda: forwarder.sessions == 2)
        assert forwarder.unread_drops == 1


async def test_answers_never_echo_an_oversized_stream_id(short_tmp: Path) -> None:
    """A stream_id the host cannot use is answered `invalid stream ID` with an
    empty stream_id, also for a forward the host does not know: a VM cannot
    make the host send its megabyte back."""
    forward = fwd(short_tmp, "a")
    async with running_host(short_tmp, [forward]) as env:
        guest = FakeGuest()
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            for forward_id in ("fwd-a", "unknown"):
                result = await call.connect(BIG_ID, forward_id)
                assert (result.stream_id, result.error) == ("", "invalid stream ID")
            assert env.forwarder.unknown_requests == 1
            assert env.forwarder.stats()["fwd-a"].failed == {"bad_stream_id": 1}


async def test_vm_that_reads_again_gets_every_answer_in_order(short_tmp: Path) -> None:
    """A VM sends 400 ConnectRequests and reads nothing until the host has stopped
    reading them (too much queued for it), then reads again: the host goes on,
    every request gets its answer, in order, and the RPC connection stays."""
    count = 400
    forward = fwd(short_tmp, "a")
    async with running_host(short_tmp, [forward], max_queued_to_vm=MARK, vm_read_timeout=30) as env:
        forwarder: Forwarder = env.forwarder
        async with flooding_vm(env.rpc) as (vm, accept_id):
            loop = asyncio.get_running_loop()

            async def send_all() -> None:
                for i in range(count):
                    request = pb.ConnectRequest(stream_id=f"s-{i}", forward_id=LONG_FORWARD_ID)
                    data = request.SerializeToString()
                    await loop.sock_sendall(
                        vm.sock, _HEADER.pack(len(data), accept_id, _DATA, 0) + data
                    )

            sending = asyncio.ensure_future(send_all())
            await wait_until(lambda: forwarder.queued_to_vm > MARK)
            assert forwarder.unknown_requests < count, "the host never stopped reading"
            answered: list[str] = []
            async with asyncio.timeout(20):
                while len(answered) < count:
                    stream_id, type_, data = await vm._frame()
                    if stream_id == accept_id and type_ == _DATA:
                        answered.append(pb.ConnectResult.FromString(data).stream_id)
                await sending
        assert answered == [f"s-{i}" for i in range(count)]
        assert forwarder.unknown_requests == count
        assert forwarder.unread_drops == 0
