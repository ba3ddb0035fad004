"""Test-side peers of the guest: a host that answers Accept streams the way
nerdbox's shim does, a target service, and container clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import ttrpc_asyncio as ttrpc
from socketforward import datastream, relay, transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardStub
from socketforward.guest import Service
from socketforward.protocol import FORWARD_IDS_METADATA, PICK_POOLED_METADATA
from tests.processes import short_tmp_dir

# A generous bound for things that should happen; never a measured time.
PATIENCE = 30.0


short_tmp = short_tmp_dir


async def until(predicate: Callable[[], bool]) -> None:
    """Poll *predicate* until it holds; fails after PATIENCE seconds."""
    async with asyncio.timeout(PATIENCE):
        for _ in itertools.count():
            if predicate():
                return
            await asyncio.sleep(0.01)


def trailer(payload: bytes) -> bytes:
    return f"EOF {len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


class EchoService:
    """The host's target: echoes every byte, and after the client's EOF
    (half-close) answers with a trailer naming count and sha256, then closes."""

    def __init__(self, listener: transport.Listener) -> None:
        self.listener = listener
        self.endpoint = listener.endpoint
        self.accepted = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, path: Path) -> EchoService:
        service = cls(await transport.listen(transport.UnixEndpoint(str(path))))
        service._accept_task = asyncio.get_running_loop().create_task(service._accept_loop())
        return service

    async def _accept_loop(self) -> None:
        while True:
            conn = await self.listener.accept()
            self.accepted += 1
            task = asyncio.get_running_loop().create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        digest, count = hashlib.sha256(), 0
        with conn:
            try:
                while chunk := await loop.sock_recv(conn, 1 << 16):
                    digest.update(chunk)
                    count += len(chunk)
                    await loop.sock_sendall(conn, chunk)
                await loop.sock_sendall(conn, f"EOF {count} {digest.hexdigest()}\n".encode())
            except OSError:
                pass

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._accept_task] if self._accept_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.listener.close()


async def roundtrip(path: Path | str, payload: bytes) -> bytes:
    """A container process: connect, send, half-close, read to EOF."""
    loop = asyncio.get_running_loop()
    sock = await transport.connect(transport.UnixEndpoint(str(path)), timeout=PATIENCE)
    with sock:

        async def send() -> None:
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, payload)
                sock.shutdown(socket.SHUT_WR)

        sender = loop.create_task(send())
        received = bytearray()
        try:
            while chunk := await loop.sock_recv(sock, 1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
        finally:
            await sender
        return bytes(received)


async def read_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await loop.sock_recv(sock, 1 << 16):
            received += chunk
    return bytes(received)


@dataclass
class HostStream:
    """One host Accept stream, answering as nerdbox's shim does: one request at
    a time, opening the data stream before answering success.

    *targets*: forward_id -> target endpoint; others get ``unknown forward ID``.
    *answer*: "serve" (normal), "silent" (never answer), or an error text.
    *open_after_answer*: answer success first, then open the data stream.
    """

    stub: SocketForwardStub
    streams_ep: transport.Endpoint
    targets: dict[str, transport.Endpoint]
    announce: bool = False
    pool_tag: str = ""
    """Announced as the host's pool (docs/protocol.md 5.6): the guest may pick."""
    answer: str = "serve"
    open_after_answer: bool = False
    before_answer: Callable[[pb.ConnectRequest], None] | None = None
    received: list[pb.ConnectRequest] = field(default_factory=list)
    answered: int = 0
    max_unanswered: int = 0
    _relays: set[asyncio.Task[relay.RelayStats]] = field(default_factory=set)
    _stream: ttrpc.ClientStream[pb.ConnectResult, pb.ConnectRequest] | None = None
    _task: asyncio.Task[None] | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def open(self) -> HostStream:
        metadata = {FORWARD_IDS_METADATA: ",".join(self.targets)} if self.announce else {}
        if self.pool_tag:
            metadata[PICK_POOLED_METADATA] = self.pool_tag
        self._stream = await self.stub.Accept(metadata=metadata or None)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def send(self, result: pb.ConnectResult) -> None:
        """Send a result of the test's making on this stream."""
        assert self._stream is not None
        await self._stream.send(result)

    async def wait_received(self, n: int) -> None:
        """Until at least *n* requests arrived on this stream."""
        async with asyncio.timeout(PATIENCE), self._arrived:
            await self._arrived.wait_for(lambda: len(self.received) >= n)

    async def _run(self) -> None:
        assert self._stream is not None
        async for request in self._stream:
            self.received.append(request)
            async with self._arrived:
                self._arrived.notify_all()
            self.max_unanswered = max(self.max_unanswered, len(self.received) - self.answered)
            if self.before_answer is not None:
                self.before_answer(request)
            if self.answer == "silent":
                continue
            if self.open_after_answer and request.forward_id in self.targets:
                self.answered += 1
                await self._stream.send(pb.ConnectResult(stream_id=request.stream_id))
                await self._handle(request)
                continue
            result = await self._handle(request)
            self.answered += 1
            await self._stream.send(result)

    async def _handle(self, request: pb.ConnectRequest) -> pb.ConnectResult:
        if self.answer != "serve":
            return pb.ConnectResult(stream_id=request.stream_id, error=self.answer)
        target = self.targets.get(request.forward_id)
        if target is None:
            return pb.ConnectResult(
                stream_id=request.stream_id, error=f"unknown forward ID: {request.forward_id}"
            )
        host_sock = await transport.connect(target, timeout=PATIENCE)
        try:
            data = await datastream.open_stream(self.streams_ep, request.stream_id)
        except BaseException:
            host_sock.close()
            raise
        task = asyncio.get_running_loop().create_task(relay.relay(host_sock, data, mode="copy"))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        return pb.ConnectResult(stream_id=request.stream_id)

    async def close(self) -> None:
        """The host ends this Accept stream (its relays keep running)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._stream is not None:
            with contextlib.suppress(ttrpc.TtrpcError, ttrpc.ProtocolError):
                await self._stream.close_send()
            await self._stream.aclose()

    async def stop_relays(self) -> None:
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)


class Guest:
    """A guest Service in this process, its stream registry, and ttrpc
    connections to it over real socket pairs (the host is the client)."""

    def __init__(self, root: Path, service: Service, registry: datastream.StreamRegistry) -> None:
        self.root = root
        self.service = service
        self.registry = registry
        self.server = ttrpc.Server()
        service.register(self.server)
        self._serving: set[asyncio.Task[None]] = set()
        self._clients: list[ttrpc.Client] = []

    @property
    def streams_ep(self) -> transport.Endpoint:
        return self.registry.endpoint

    async def connect(self) -> SocketForwardStub:
        """A new RPC connection from the host."""
        host_side, guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        task = asyncio.get_running_loop().create_task(self.server.serve_connection(guest_side))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        client = await ttrpc.Client.connect(host_side)
        self._clients.append(client)
        return SocketForwardStub(client)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        await self.service.shutdown()
        await self.server.shutdown(1.0)
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_guest(
    *,
    max_unanswered_per_stream: int = 32,
    pending_limit: int = 4096,
    pending_timeout: float = 30.0,
    fail_fast: bool = False,
    pooled: bool = False,
) -> AsyncIterator[Guest]:
    """A Service on a fresh short temporary directory, shut down afterwards;
    with *pooled* it keeps the host's pooled streams (and picks them)."""
    with short_tmp() as root:
        listener = await transport.listen(transport.UnixEndpoint(str(root / "streams.sock")))
        registry = datastream.StreamRegistry(listener)
        registry.start()
        service = Service(
            registry,
            max_unanswered_per_stream=max_unanswered_per_stream,
            pending_limit=pending_limit,
            pending_timeout=pending_timeout,
            fail_fast=fail_fast,
            pooled_streams=registry if pooled else None,
        )
        guest = Guest(root, service, registry)
        try:
            yield guest
        finally:
            await guest.close()


async def bind(stub: SocketForwardStub, entries: dict[str, Path | str]) -> None:
    await stub.Bind(
        pb.BindRequest(
            sockets=[pb.Socket(forward_id=k, socket_path=str(v)) for k, v in entries.items()]
        ),
        timeout=PATIENCE,
    )
