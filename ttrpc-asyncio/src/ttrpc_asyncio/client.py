"""asyncio ttrpc client: unary calls and streams multiplexed on one connection."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ._channel import CLOSE_TIMEOUT, Channel
from ._connection import (
    DataReceived,
    Event,
    FrameRejected,
    ResponseReceived,
)
from ._frame import Flags
from ._state import Role
from .context import MetadataLike, metadata_to_wire
from .errors import Code, StreamClosedError, TtrpcError
from .proto import ttrpc_pb2
from .stream import RECEIVE_QUEUE_SIZE, ClientStream, MessageQueue

log = logging.getLogger(__name__)

SendT = TypeVar("SendT", bound=Message)
RecvT = TypeVar("RecvT", bound=Message)


def unix_socket_path(address: str | os.PathLike[str]) -> str:
    """The socket path of ``unix://PATH``, ``unix:PATH`` or a plain ``PATH``."""
    address = os.fspath(address)
    for scheme in ("unix://", "unix:"):
        if address.startswith(scheme):
            return address.removeprefix(scheme)
    return address


def _status_error(response: ttrpc_pb2.Response) -> TtrpcError | None:
    status = response.status
    if status.code == Code.OK:
        return None
    return TtrpcError(status.code, status.message)


def _deadline_passed(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded"))


@dataclass(slots=True)
class _StreamCall:
    queue: MessageQueue
    client_streaming: bool
    server_streaming: bool


class _ClientChannel(Channel):
    role = Role.CLIENT

    def __init__(self) -> None:
        super().__init__()
        self.unary_calls: dict[int, asyncio.Future[bytes]] = {}
        self.stream_calls: dict[int, _StreamCall] = {}
        self.lost_error = TtrpcError(Code.UNAVAILABLE, "ttrpc: connection closed")

    def handle_event(self, event: Event) -> None:
        if isinstance(event, ResponseReceived):
            future = self.unary_calls.pop(event.stream_id, None)
            if future is not None:
                if not future.done():
                    future.set_result(event.data)
                return
            call = self.stream_calls.pop(event.stream_id, None)
            if call is not None:
                self._finish_stream(call, event.data)
            return
        if isinstance(event, DataReceived):
            call = self.stream_calls.get(event.stream_id)
            if call is None:
                future = self.unary_calls.pop(event.stream_id, None)
                if future is not None and not future.done():
                    self.conn.abandon(event.stream_id)
                    future.set_exception(
                        TtrpcError(Code.INTERNAL, "received data from non-streaming server")
                    )
                return
            if not call.server_streaming:
                self.stream_calls.pop(event.stream_id, None)
                self.conn.abandon(event.stream_id)
                call.queue.fail(
                    TtrpcError(Code.INTERNAL, "received data from non-streaming server")
                )
                return
            if event.data is not None and not self.deliver(
                call.queue, event.stream_id, event.data, event
            ):
                return  # held back until the consumer makes room; handled again then
            if event.end_stream:
                self.stream_calls.pop(event.stream_id, None)
                call.queue.finish()
            return
        if isinstance(event, FrameRejected):
            future = self.unary_calls.pop(event.stream_id, None)
            call = self.stream_calls.pop(event.stream_id, None)
            error = TtrpcError(event.code, event.message)
            if future is not None and not future.done():
                future.set_exception(error)
            elif call is not None:
                call.queue.fail(error)
            else:
                # Typically the end of a call abandoned here; nothing is waiting for it.
                log.debug("ttrpc client: %s stream_id=%d", event.message, event.stream_id)

    def _finish_stream(self, call: _StreamCall, data: bytes) -> None:
        try:
            response = ttrpc_pb2.Response.FromString(data)
        except DecodeError as exc:
            call.queue.fail(TtrpcError(Code.INTERNAL, f"ttrpc: bad response: {exc}"))
            return
        error = _status_error(response)
        if error is not None:
            call.queue.finish(error)
            return
        if not call.server_streaming or response.payload:
            # The final response carries the call's one message.
            call.queue.offer(response.payload, force=True)
        call.queue.finish()

    def on_stream_full(self, stream_id: int) -> None:
        call = self.stream_calls.pop(stream_id, None)
        self.conn.abandon(stream_id)
        if call is not None:
            call.queue.fail(TtrpcError(Code.RESOURCE_EXHAUSTED, "ttrpc: stream buffer full"))

    def on_connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.lost_error = TtrpcError(Code.UNAVAILABLE, f"ttrpc: connection lost: {exc}")
        for future in self.unary_calls.values():
            if not future.done():
                future.set_exception(self.lost_error)
        for call in self.stream_calls.values():
            call.queue.fail(self.lost_error)
        self.unary_calls.clear()
        self.stream_calls.clear()


class Client:
    """A ttrpc client on one connected socket (which it owns and closes).

    The socket may have been dialed or accepted: a host that accepts a VM
    agent's dial can be the client on it."""

    def __init__(self, channel: _ClientChannel) -> None:
        self._channel = channel

    @classmethod
    async def connect(cls, sock: socket.socket) -> Client:
        """Run a client on ``sock``, a connected stream socket."""
        channel = _ClientChannel()
        await channel.attach(sock)
        return cls(channel)

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str]) -> Client:
        """Dial a UNIX socket and run a client on it. ``path`` may be written as
        containerd prints ttrpc addresses, ``unix:///run/x.sock`` or ``unix:x.sock``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, unix_socket_path(path))
        except BaseException:
            sock.close()
            raise
        return await cls.connect(sock)

    @property
    def closed(self) -> bool:
        return not self._channel.is_connected()

    async def wait_closed(self) -> None:
        """Returns when the connection is gone (closed by either side)."""
        await asyncio.shield(self._channel.closed)

    # -- flow control toward the server ---------------------------------------------

    @property
    def write_buffer_size(self) -> int:
        """Bytes written to the connection that the server has not taken yet,
        beyond what the kernel's socket buffer holds. ``send_nowait`` adds to it
        at once; it shrinks as the server reads. 0 once the connection is gone."""
        return self._channel.write_buffer_size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Flow-control marks, in asyncio's meaning: once more than *high* bytes
        are queued toward the server, awaited sends and :meth:`drain` wait until
        the queue is down to *low*. Defaults: the transport's (64 KiB high);
        *low* defaults to a quarter of *high*."""
        self._channel.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        """Read nothing more from the server until :meth:`resume_reading`: its
        writes then push back on it (e.g. while it does not read ours). Calls
        get no messages meanwhile."""
        self._channel.hold_reading(True)

    def resume_reading(self) -> None:
        self._channel.hold_reading(False)

    async def drain(self) -> None:
        """Return once writing may go on: at once while the queue toward the
        server has not gone past the high mark, else when it is back at the low
        mark. Raises UNAVAILABLE when the connection is lost instead. It never
        times out by itself: bound it with ``asyncio.timeout``."""
        self._check_open()
        await self._channel.drain()
        self._check_open()

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the connection; what is already written is sent first, for up
        to *timeout* seconds while the server does not read, then it is cut."""
        self._channel.close(timeout)
        await self.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _request(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None,
        metadata: MetadataLike | None,
    ) -> bytes:
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout is not None:
            request.timeout_nano = max(1, int(timeout * 1e9))
        if metadata:
            request.metadata.extend(metadata_to_wire(metadata))
        return request.SerializeToString()

    def _check_open(self) -> None:
        if not self._channel.is_connected():
            raise self._channel.lost_error

    async def unary(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[RecvT],
        *,
        timeout: float | None = None,
        metadata: MetadataLike | None = None,
    ) -> RecvT:
        """One request, one response. ``timeout`` (seconds) is sent to the server as
        its deadline and bounds the wait here; either way DEADLINE_EXCEEDED."""
        self._check_open()
        channel = self._channel
        data = self._request(service, method, request.SerializeToString(), timeout, metadata)
        stream_id, frame = channel.conn.send_request(data)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        channel.unary_calls[stream_id] = future
        timer: asyncio.TimerHandle | None = None
        try:
            await channel.write(frame)
            if timeout is not None:
                # A bare timer, not asyncio.timeout (a scope, a task lookup):
                # callers may make a unary call per connection they serve.
                timer = loop.call_later(timeout, _deadline_passed, future)
            raw = await future
        finally:
            if timer is not None:
                timer.cancel()
            if not future.done():
                future.cancel()
            if channel.unary_calls.pop(stream_id, None) is not None:
                channel.conn.abandon(stream_id)
        try:
            response = ttrpc_pb2.Response.FromString(raw)
            error = _status_error(response)
            if error is not None:
                raise error
            return response_type.FromString(response.payload)
        except DecodeError as exc:
            raise TtrpcError(Code.INTERNAL, f"ttrpc: bad response: {exc}") from exc

    async def stream(
        self,
        service: str,
        method: str,
        response_type: type[RecvT],
        *,
        client_streaming: bool,
        server_streaming: bool,
        request: Message | None = None,
        metadata: MetadataLike | None = None,
    ) -> ClientStream[SendT, RecvT]:
        """Open a streaming call. For server-streaming calls pass the ``request``."""
        self._check_open()
        channel = self._channel
        payload = b"" if request is None else request.SerializeToString()
        data = self._request(service, method, payload, None, metadata)
        if not client_streaming:
            flags = Flags.REMOTE_CLOSED
        elif request is None:
            # "No data" as ttrpc-rust's client sends it: its server would take
            # the empty payload for a first message (containerd/ttrpc-rust#221);
            # Go's ignores the payload of a client-streaming request either way.
            flags = Flags.REMOTE_OPEN | Flags.NO_DATA
        else:
            flags = Flags.REMOTE_OPEN
        stream_id, frame = channel.conn.send_request(data, flags)
        queue = MessageQueue(RECEIVE_QUEUE_SIZE, channel.queue_has_space)
        channel.stream_calls[stream_id] = _StreamCall(queue, client_streaming, server_streaming)
        try:
            await channel.write(frame)
        except BaseException:
            channel.stream_calls.pop(stream_id, None)
            channel.conn.abandon(stream_id)
            raise
        return ClientStream(
            stream_id,
            queue,
            response_type,
            client_streaming=client_streaming,
            server_streaming=server_streaming,
            send_data=self._send_data,
            send_data_nowait=self._send_data_nowait,
            send_close=self._send_close,
            abandon=self._abandon,
        )

    def _data_frame(self, stream_id: int, data: bytes) -> bytes:
        self._check_open()
        try:
            return self._channel.conn.send_data(stream_id, data)
        except TtrpcError:
            raise
        except Exception as exc:
            raise StreamClosedError(f"stream {stream_id}: {exc}") from exc

    async def _send_data(self, stream_id: int, data: bytes) -> None:
        await self._channel.write(self._data_frame(stream_id, data))

    def _send_data_nowait(self, stream_id: int, data: bytes) -> None:
        self._channel.write_nowait(self._data_frame(stream_id, data))

    async def _send_close(self, stream_id: int) -> None:
        self._check_open()
        try:
            frame = self._channel.conn.send_close(stream_id)
        except Exception as exc:
            raise StreamClosedError(f"stream {stream_id}: {exc}") from exc
        await self._channel.write(frame)

    def _abandon(self, stream_id: int) -> None:
        self._channel.stream_calls.pop(stream_id, None)
        self._channel.conn.abandon(stream_id)
