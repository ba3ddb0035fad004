"""asyncio ttrpc server: services registered from their proto descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError, Message

from ._channel import Channel
from ._connection import (
    DataReceived,
    Event,
    FrameRejected,
    RequestReceived,
)
from ._state import Role, StreamState
from .context import CallContext, PeerCredentials, metadata_from_wire
from .errors import Code, LocalProtocolError, StreamClosedError, TtrpcError
from .proto import status_pb2, ttrpc_pb2
from .stream import RECEIVE_QUEUE_SIZE, MessageQueue, ServerStream, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Method:
    """A registered RPC: the bound handler and what the descriptor says of it."""

    name: str
    handler: Callable[..., Any]
    request_type: type[Message]
    client_streaming: bool
    server_streaming: bool
    immediate: bool = False
    """A unary method whose handler is a plain function, not ``async def``: it is
    called as the request is read and may answer at once (:meth:`Server.register`)."""


def _status(code: Code | int, message: str) -> bytes:
    status = status_pb2.Status(code=int(code), message=message)
    return ttrpc_pb2.Response(status=status).SerializeToString()


@dataclass(slots=True)
class _Call:
    method: Method
    task: asyncio.Task[None] | None = None
    queue: MessageQueue | None = None
    expired: bool = False
    """Its deadline passed and cancelled the task (not yet taken back by uncancel)."""


class _ServerChannel(Channel):
    role = Role.SERVER

    def __init__(self, server: Server, peer: PeerCredentials | None) -> None:
        super().__init__()
        self.server = server
        self.peer = peer
        self.calls: dict[int, _Call] = {}

    @property
    def busy(self) -> bool:
        return bool(self.calls)

    def handle_event(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self._start(event)
        elif isinstance(event, DataReceived):
            call = self.calls.get(event.stream_id)
            if call is None or call.queue is None:
                return  # a unary method sent stream data: nothing reads it
            if event.data is not None and not self.deliver(
                call.queue, event.stream_id, event.data, event
            ):
                return  # held back until the handler reads; handled again then
            if event.end_stream:
                call.queue.finish()
        elif isinstance(event, FrameRejected):
            log.warning("ttrpc server: rejected frame stream_id=%d code=%s: %s",
                        event.stream_id, event.code.name, event.message)  # fmt: skip
            self._end_call(event.stream_id)
            self.write_nowait(self.conn.send_response(event.stream_id, _status(
                event.code, event.message)))  # fmt: skip

    def _end_call(self, stream_id: int) -> None:
        call = self.calls.pop(stream_id, None)
        if call is not None and call.task is not None:
            call.task.cancel()

    def _answer(self, stream_id: int, code: Code | int, message: str) -> None:
        self.write_nowait(self.conn.send_response(stream_id, _status(code, message)))

    def _start(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.server.draining:
            self._answer(stream_id, Code.UNAVAILABLE, "ttrpc: server shutting down")
            return
        try:
            request = ttrpc_pb2.Request.FromString(event.data)
        except DecodeError as exc:
            self._answer(stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        service = self.server.services.get(request.service)
        if service is None:
            self._answer(stream_id, Code.UNIMPLEMENTED, f"service {request.service}")
            return
        method = service.get(request.method)
        if method is None:
            self._answer(stream_id, Code.UNIMPLEMENTED, f"method {request.method}")
            return
        loop = self._loop
        context = CallContext(
            service=request.service,
            method=request.method,
            metadata=metadata_from_wire(request.metadata),
            deadline=loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None,
            peer=self.peer,
        )
        if method.immediate:
            self._start_immediate(stream_id, method, context, request.payload)
            return
        call = _Call(method)
        if method.client_streaming:
            call.queue = MessageQueue(RECEIVE_QUEUE_SIZE, self.queue_has_space)
            if request.payload:
                # A client may put its first message in the request (Go does not).
                call.queue.offer(request.payload)
        self.calls[stream_id] = call
        call.task = loop.create_task(self._run(stream_id, call, context, request.payload))
        self.server.track(call.task)

    def _start_immediate(
        self, stream_id: int, method: Method, context: CallContext, payload: bytes
    ) -> None:
        """Call a plain-function unary handler now: its answer goes out at once
        (no task); an awaitable it returns instead is awaited in a task, as a
        coroutine handler is."""
        try:
            result = method.handler(decode(method.request_type, payload), context)
        except TtrpcError as exc:
            self._answer(stream_id, exc.code, exc.message)
            return
        except Exception as exc:
            log.exception("ttrpc server: handler failed method=/%s/%s stream_id=%d",
                          context.service, method.name, stream_id)  # fmt: skip
            self._answer(stream_id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        if not inspect.isawaitable(result):
            response = ttrpc_pb2.Response(payload=result.SerializeToString())
            self.write_nowait(self.conn.send_response(stream_id, response.SerializeToString()))
            return
        call = _Call(method)
        self.calls[stream_id] = call
        call.task = self._loop.create_task(self._run(stream_id, call, context, b"", result))
        self.server.track(call.task)
        if inspect.iscoroutine(result):
            # Cancelled before its first step, the task never awaits it: close it.
            call.task.add_done_callback(lambda _: result.close())

    async def _run(
        self,
        stream_id: int,
        call: _Call,
        context: CallContext,
        payload: bytes,
        started: Awaitable[Message] | None = None,
    ) -> None:
        method = call.method
        response: bytes | None
        # A bare timer, not asyncio.timeout_at (a scope object, a task lookup,
        # four calls): a client may make a unary call per connection it serves.
        timer = None
        if context.deadline is not None:
            timer = self._loop.call_at(context.deadline, self._deadline_passed, call)
        try:
            if started is not None:
                answer = (await started).SerializeToString()
                response = ttrpc_pb2.Response(payload=answer).SerializeToString()
            else:
                response = await self._invoke(stream_id, call, context, payload)
        except TimeoutError:
            response = _status(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
        except TtrpcError as exc:
            response = _status(exc.code, exc.message)
        except asyncio.CancelledError:
            if not self._cancelled_by_deadline(call):
                self.calls.pop(stream_id, None)
                raise
            response = _status(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
        except Exception as exc:
            log.exception("ttrpc server: handler failed method=/%s/%s stream_id=%d",
                          context.service, method.name, stream_id)  # fmt: skip
            response = _status(Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            if timer is not None:
                timer.cancel()
                self._cancelled_by_deadline(call)  # a handler that swallowed it
        if self.calls.pop(stream_id, None) is None:
            return  # the stream was already answered (rejected frame)
        if self.conn.stream_state(stream_id) is StreamState.CLOSED or not self.is_connected():
            return
        try:
            if response is not None:
                frame = self.conn.send_response(stream_id, response)
            else:
                frame = self.conn.send_close(stream_id)
            await self.write(frame)
        except (TtrpcError, LocalProtocolError) as exc:
            log.debug("ttrpc server: could not finish stream_id=%d: %s", stream_id, exc)

    @staticmethod
    def _deadline_passed(call: _Call) -> None:
        if call.task is not None and not call.task.done():
            call.expired = True
            call.task.cancel()

    @staticmethod
    def _cancelled_by_deadline(call: _Call) -> bool:
        """Take back the deadline's cancellation (once); True when it was the
        only one, as asyncio.timeout tells (another cancel must propagate)."""
        if not call.expired or call.task is None:
            return False
        call.expired = False
        return call.task.uncancel() == 0

    async def _invoke(
        self, stream_id: int, call: _Call, context: CallContext, payload: bytes
    ) -> bytes | None:
        """Run the handler; the encoded Response, or None for a stream that ends
        with a no-data close (server streaming, as containerd/ttrpc does)."""
        method = call.method
        if not method.client_streaming and not method.server_streaming:
            result = await method.handler(decode(method.request_type, payload), context)
            return ttrpc_pb2.Response(payload=result.SerializeToString()).SerializeToString()
        queue = call.queue or MessageQueue(1, self.queue_has_space)

        def frame(data: bytes) -> bytes:
            try:
                return self.conn.send_data(stream_id, data)
            except LocalProtocolError as exc:
                raise StreamClosedError(f"stream {stream_id}: {exc}") from exc

        async def send(data: bytes) -> None:
            await self.write(frame(data))

        def send_nowait(data: bytes) -> None:
            self.check_open()
            self.write_nowait(frame(data))

        stream: ServerStream[Message, Message] = ServerStream(
            context, queue, method.request_type, send, send_nowait
        )
        if not method.client_streaming:
            await method.handler(decode(method.request_type, payload), stream)
            return None
        result = await method.handler(stream)
        if method.server_streaming:
            return None
        return ttrpc_pb2.Response(payload=result.SerializeToString()).SerializeToString()

    def on_stream_full(self, stream_id: int) -> None:
        self._end_call(stream_id)
        self._answer(stream_id, Code.RESOURCE_EXHAUSTED,
                     "data handling error: ttrpc: stream buffer full")  # fmt: skip

    def on_connection_lost(self, exc: Exception | None) -> None:
        for stream_id in list(self.calls):
            self._end_call(stream_id)


class Server:
    """Serves registered services on accepted connections or on single sockets.

    ``require_same_user``: UNIX-socket peers must have our effective uid and gid
    (SO_PEERCRED), as containerd/ttrpc's UnixSocketRequireSameUser;
    ``require_uid_gid`` names them explicitly (None in either place: any)."""

    def __init__(
        self,
        *,
        require_same_user: bool = False,
        require_uid_gid: tuple[int | None, int | None] | None = None,
    ) -> None:
        self.services: dict[str, dict[str, Method]] = {}
        if require_same_user:
            require_uid_gid = (os.geteuid(), os.getegid())
        self.require_uid_gid = require_uid_gid
        self.draining = False
        self._channels: set[_ServerChannel] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._accept_tasks: set[asyncio.Task[None]] = set()

    def register(
        self, service: object, service_descriptor: descriptor.ServiceDescriptor | None = None
    ) -> None:
        """Serve ``service``'s methods, found by name from its proto service descriptor
        (the generated ``XxxBase`` carries it as ``SERVICE_DESCRIPTOR``).

        A unary handler may be a plain function instead of ``async def``: it is
        then called in the loop callback that read the request, so it must not
        block, and returns the response (sent at once, no task per call) or an
        awaitable, which is awaited in a task with the call's deadline, as a
        coroutine handler is."""
        desc = service_descriptor or getattr(service, "SERVICE_DESCRIPTOR", None)
        if not isinstance(desc, descriptor.ServiceDescriptor):
            raise TypeError(f"{type(service).__name__} has no SERVICE_DESCRIPTOR; pass one")
        if desc.full_name in self.services:
            raise ValueError(f"service {desc.full_name} is already registered")
        methods: dict[str, Method] = {}
        for m in desc.methods:
            handler = getattr(service, m.name, None)
            if handler is None or not callable(handler):
                raise TypeError(
                    f"{type(service).__name__} lacks method {m.name} of {desc.full_name}"
                )
            methods[m.name] = Method(
                name=m.name,
                handler=handler,
                request_type=message_factory.GetMessageClass(m.input_type),
                client_streaming=m.client_streaming,
                server_streaming=m.server_streaming,
                immediate=not (m.client_streaming or m.server_streaming)
                and not inspect.iscoroutinefunction(handler),
            )
        self.services[desc.full_name] = methods

    def track(self, task: asyncio.Task[None]) -> None:
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _check_peer(self, sock: socket.socket) -> PeerCredentials | None:
        peer = PeerCredentials.of(sock)
        if peer is None:
            return None
        if self.require_uid_gid is not None:
            uid, gid = self.require_uid_gid
            if (uid is not None and peer.uid != uid) or (gid is not None and peer.gid != gid):
                raise PermissionError(
                    f"peer pid={peer.pid} uid={peer.uid} gid={peer.gid} does not match "
                    f"required uid={uid} gid={gid}"
                )
        return peer

    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one connected socket (accepted or dialed) until it closes. Owns ``sock``."""
        try:
            peer = self._check_peer(sock)
        except PermissionError as exc:
            log.warning("ttrpc server: refused connection: %s", exc)
            sock.close()
            return
        except OSError:
            sock.close()
            raise
        channel = _ServerChannel(self, peer)
        await channel.attach(sock)
        self._channels.add(channel)
        try:
            await asyncio.shield(channel.closed)
        except asyncio.CancelledError:
            channel.close()
            raise
        finally:
            self._channels.discard(channel)

    async def serve(self, listener: socket.socket) -> None:
        """Accept and serve connections until :meth:`shutdown`. The caller owns
        ``listener``; accepted connections are ours."""
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        connections: set[asyncio.Task[None]] = set()
        try:
            while not self.draining:
                sock, _ = await loop.sock_accept(listener)
                task = loop.create_task(self.serve_connection(sock))
                connections.add(task)
                task.add_done_callback(connections.discard)
        finally:
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    def start(self, listener: socket.socket) -> asyncio.Task[None]:
        """Run :meth:`serve` in the background; :meth:`shutdown` stops it."""
        task = asyncio.get_running_loop().create_task(self.serve(listener))
        self._accept_tasks.add(task)
        task.add_done_callback(self._accept_tasks.discard)
        return task

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, refuse new calls, let running calls finish for up to
        ``grace`` seconds, then cancel them and close every connection."""
        self.draining = True
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=grace)
        for task in set(self._handlers):
            task.cancel()
        for channel in set(self._channels):
            channel.close()
        for task in set(self._accept_tasks):
            task.cancel()
        waits = [c.closed for c in self._channels] + list(self._accept_tasks | self._handlers)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
