"""Test doubles for the host side: a guest played by a real ttrpc server on a
real socket, real UNIX target services, and a misbehaving stream endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

from google.protobuf import any_pb2, empty_pb2

import ttrpc_asyncio as ttrpc
from socketforward import datastream, transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardBase
from socketforward.protocol import FORWARD_IDS_METADATA, valid_stream_id

AcceptServerStream = ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest]


class AcceptCall:
    """One Accept stream opened by the host, seen from the guest."""

    def __init__(self, stream: AcceptServerStream) -> None:
        self.stream = stream
        self.announced = stream.context.get(FORWARD_IDS_METADATA)
        self.results: dict[str, asyncio.Future[pb.ConnectResult]] = {}
        self.ended = asyncio.Event()

    async def request(
        self, stream_id: str, forward_id: str, data_stream_id: str = ""
    ) -> asyncio.Future[pb.ConnectResult]:
        """Send a ConnectRequest; the future resolves with the host's result."""
        future: asyncio.Future[pb.ConnectResult] = asyncio.get_running_loop().create_future()
        self.results[stream_id] = future
        await self.stream.send(
            pb.ConnectRequest(
                stream_id=stream_id, forward_id=forward_id, data_stream_id=data_stream_id
            )
        )
        return future

    async def send_undecodable(self, stream_id: str, forward_id: bytes) -> None:
        """Send a ConnectRequest whose forward_id is raw bytes (say, not UTF-8,
        which protobuf refuses to decode as a string)."""
        # Any{string type_url = 1; bytes value = 2} is ConnectRequest's wire
        # shape with bytes where forward_id has a string.
        raw = any_pb2.Any(type_url=stream_id, value=forward_id)
        await self.stream.send(cast("pb.ConnectRequest", raw))

    async def connect(self, stream_id: str, forward_id: str) -> pb.ConnectResult:
        future = await self.request(stream_id, forward_id)
        async with asyncio.timeout(30):
            return await future

    def unechoed(self) -> asyncio.Future[pb.ConnectResult] | None:
        """The oldest unanswered request with an invalid stream_id: the host
        answers those with an empty stream_id instead of echoing them."""
        for stream_id, future in self.results.items():
            if not future.done() and not valid_stream_id(stream_id):
                return future
        return None


class FakeGuest(SocketForwardBase):
    """Records Bind/Unbind; each Accept call is queued for the test to drive.

    With a *registry*, a success result makes it claim the data stream at
    once, as the real guest does: ``claimed[stream_id]`` is the VM side of the
    data stream, or None if it was not there when the success arrived.

    With *ends*, it serves StreamEnds (docs/protocol.md 5.5): its hello names
    channel ``ENDS_CHANNEL``, the host's ends land in ``ends``, and
    :meth:`send_end` sends one; without, StreamEnds is UNIMPLEMENTED.
    """

    ENDS_CHANNEL = 7

    def __init__(
        self,
        *,
        registry: datastream.StreamRegistry | None = None,
        unbind: bool = True,
        ends: bool = False,
    ) -> None:
        self.registry = registry
        self.unbind_supported = unbind
        self.ends_supported = ends
        self.ends: asyncio.Queue[pb.StreamEnd] = asyncio.Queue()
        self._ends_stream: ttrpc.ServerStream[pb.StreamEnd, pb.StreamEnd] | None = None
        self.binds: list[list[tuple[str, str]]] = []
        self.unbinds: list[list[str]] = []
        self.accepts: asyncio.Queue[AcceptCall] = asyncio.Queue()
        self.claimed: dict[str, socket.socket | None] = {}

    async def Bind(self, request: pb.BindRequest, context: ttrpc.CallContext) -> empty_pb2.Empty:
        self.binds.append([(s.forward_id, s.socket_path) for s in request.sockets])
        return empty_pb2.Empty()

    async def Unbind(
        self, request: pb.UnbindRequest, context: ttrpc.CallContext
    ) -> empty_pb2.Empty:
        if not self.unbind_supported:
            raise ttrpc.TtrpcError(ttrpc.Code.UNIMPLEMENTED, "method Unbind")
        if request.forward_ids:  # an Unbind of nothing is the host's probe (protocol.md 4.9)
            self.unbinds.append(list(request.forward_ids))
        return empty_pb2.Empty()

    async def Accept(self, stream: AcceptServerStream) -> None:
        call = AcceptCall(stream)
        self.accepts.put_nowait(call)
        try:
            async for result in stream:
                if self.registry is not None and not result.error:
                    try:
                        self.claimed[result.stream_id] = self.registry.get(result.stream_id)
                    except datastream.StreamNotFound:
                        self.claimed[result.stream_id] = None
                future = call.results.get(result.stream_id)
                if (future is None or future.done()) and not result.stream_id:
                    future = call.unechoed()
                if future is not None and not future.done():
                    future.set_result(result)
        finally:
            call.ended.set()

    async def StreamEnds(self, stream: ttrpc.ServerStream[pb.StreamEnd, pb.StreamEnd]) -> None:
        if not self.ends_supported:
            raise ttrpc.TtrpcError(ttrpc.Code.UNIMPLEMENTED, "method StreamEnds")
        self._ends_stream = stream
        await stream.send(pb.StreamEnd(channel=self.ENDS_CHANNEL))
        async for end in stream:
            self.ends.put_nowait(end)

    async def send_end(self, stream_id: str, total: int) -> None:
        """Tell the host that the VM -> host direction of *stream_id* carried *total* bytes."""
        # The host waits for the hello before it opens Accept: the call is here.
        assert self._ends_stream is not None, "the host opened no StreamEnds call"
        await self._ends_stream.send(pb.StreamEnd(stream_id=stream_id, bytes=total))

    async def next_end(self) -> pb.StreamEnd:
        async with asyncio.timeout(30):
            return await self.ends.get()

    async def next_accept(self) -> AcceptCall:
        async with asyncio.timeout(30):
            return await self.accepts.get()

    def close_claimed(self) -> None:
        for sock in self.claimed.values():
            if sock is not None:
                sock.close()
        self.claimed.clear()


@contextlib.asynccontextmanager
async def guest_dialing(
    guest: FakeGuest, rpc: transport.Endpoint
) -> AsyncIterator[asyncio.Task[None]]:
    """The guest dials the host's RPC endpoint and serves on that one socket.
    Cancelling the yielded task drops the connection."""
    server = ttrpc.Server()
    server.register(guest)
    sock = await transport.connect(rpc, timeout=10)
    task = asyncio.get_running_loop().create_task(server.serve_connection(sock))
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task})
        await server.shutdown(grace=0)


class UnixService:
    """A real UNIX socket service on the host; counts the connections it accepts."""

    def __init__(
        self, listener: transport.Listener, handler: Callable[[socket.socket], Awaitable[None]]
    ) -> None:
        self.listener = listener
        self.handler = handler
        self.accepted = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self) -> None:
        while True:
            conn = await self.listener.accept()
            self.accepted += 1
            task = asyncio.get_running_loop().create_task(self._run(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            await self.handler(conn)


@contextlib.asynccontextmanager
async def unix_service(
    path: Path, handler: Callable[[socket.socket], Awaitable[None]]
) -> AsyncIterator[UnixService]:
    service = UnixService(await transport.listen(transport.UnixEndpoint(str(path))), handler)
    task = asyncio.get_running_loop().create_task(service._serve())
    try:
        yield service
    finally:
        task.cancel()
        await asyncio.wait({task})
        for t in list(service._tasks):
            t.cancel()
        await asyncio.gather(*service._tasks, return_exceptions=True)
        service.listener.close()


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        data += chunk
    return bytes(data)


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


async def reverse_after_eof(sock: socket.socket) -> None:
    """Read to EOF, then answer with the bytes reversed: proves half-close and
    byte-exact transfer both ways."""
    data = await recv_all(sock)
    await asyncio.get_running_loop().sock_sendall(sock, data[::-1])


async def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send *payload*, half-close, read the answer to EOF (with a bound)."""
    async with asyncio.timeout(30):
        await asyncio.get_running_loop().sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        return await recv_all(sock)


class HugeAckEndpoint:
    """A misbehaving guest stream endpoint: for ids starting with ``evil-`` it
    answers with an ack length of 4 GiB - 1, for ``silent-`` nothing at all
    (``silent`` counts them, ``silent_closed`` those the host hung up on since);
    other ids get a proper ack (``slow-`` ones in pieces) and the connection is
    kept in ``streams``."""

    def __init__(self, listener: transport.Listener) -> None:
        self.listener = listener
        self.streams: dict[str, socket.socket] = {}
        self.silent = 0
        self.silent_closed = 0  # ... and closed by the host since
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        while True:
            conn = await self.listener.accept()
            task = asyncio.get_running_loop().create_task(self._handshake(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        (size,) = struct.unpack(">I", await recv_exactly(conn, 4))
        stream_id = (await recv_exactly(conn, size)).decode()
        if stream_id.startswith("silent-"):
            self.silent += 1
            with conn:
                await recv_all(conn)  # until the host gives up
            self.silent_closed += 1
            return
        if stream_id.startswith("evil-"):
            with conn:
                await loop.sock_sendall(conn, struct.pack(">I", 0xFFFFFFFF) + b"x" * 16)
                await recv_all(conn)  # hold it until the host gives up
            return
        ack = datastream.encode_string(stream_id)
        if stream_id.startswith("slow-"):  # the ack in three pieces
            for piece in (ack[:2], ack[2:5], ack[5:-1]):
                await loop.sock_sendall(conn, piece)
                await asyncio.sleep(0.02)
            ack = ack[-1:]
        await loop.sock_sendall(conn, ack)
        self.streams[stream_id] = conn

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self.streams.values():
            conn.close()
        self.listener.close()
