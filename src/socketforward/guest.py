"""The VM side: the SocketForward ttrpc service and the ``socketforward guest`` agent.

Wire-compatible with nerdbox's vminitd socket-forward plugin (SPEC 1, 3.2):
``Bind`` creates UNIX listeners; each accepted container connection gets a
stream id and a ``ConnectRequest`` on an ``Accept`` stream; on a successful
``ConnectResult`` the data stream of that id is claimed and relayed.

Where the reference falls short this one does better (SPEC 5): requests are
routed across several Accept streams, paced per stream, queued (bounded, with a
timeout) instead of dropped, relays are half-close aware, Bind is validated and
all-or-nothing and never deletes a regular file, and the agent dials the host
again when the RPC connection drops.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol, runtime_checkable

from google.protobuf import empty_pb2

from socketforward import relay, runner, transport, ttrpc
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardBase
from socketforward.argtypes import positive_seconds
from socketforward.deadlines import Deadlines
from socketforward.ids import FORWARD_IDS_METADATA, UNKNOWN_FORWARD_ID, generate_stream_id
from socketforward.streams import StreamRegistry

__all__ = [
    "DEFAULT_RPC_DIAL",
    "DEFAULT_STREAMS",
    "FORWARD_IDS_METADATA",
    "STREAM_ID_PREFIX",
    "UNKNOWN_FORWARD_ID",
    "Agent",
    "AgentConfig",
    "ForwardStats",
    "Service",
    "StreamManager",
    "add_parser",
    "config_from_args",
    "main",
]

log = logging.getLogger("socketforward.guest")

STREAM_ID_PREFIX: Final = "socketfwd"
"""Prefix of the stream ids the guest hands out (as nerdbox's vminitd)."""
DEFAULT_RPC_DIAL: Final = "vsock://2:1025"
DEFAULT_STREAMS: Final = "vsock://:1026"

# How long accepting pauses after an accept() error (EMFILE...) instead of spinning.
_ACCEPT_BACKOFF: Final = 0.1
_PEERCRED: Final = struct.Struct("3i")


class StreamManager(Protocol):
    """Hands out data streams by id, each exactly once.

    ``get`` raises a ``LookupError`` (``StreamNotFound``) for an unknown or
    already-claimed id. :class:`~socketforward.streams.StreamRegistry` fits.
    """

    def get(self, stream_id: str) -> socket.socket: ...


@runtime_checkable
class _WaitingStreamManager(Protocol):
    # A manager that can wait a bounded time for a stream still on its way.
    async def wait_for(self, stream_id: str, timeout: float) -> socket.socket: ...


@runtime_checkable
class _ClosableStreamManager(Protocol):
    async def close(self) -> None: ...


@dataclass
class ForwardStats:
    """What happened to the connections of one forward_id."""

    accepted: int = 0
    connected: int = 0
    active: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    """Connections closed before relaying, by reason: ``queue_full``, ``timeout``,
    ``host_error``, ``unknown_forward``, ``no_stream``, ``shutdown``."""
    bytes_to_host: int = 0
    bytes_from_host: int = 0


def _peer_of(conn: socket.socket) -> ttrpc.PeerCredentials | None:
    if conn.family != socket.AF_UNIX:
        return None
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    return ttrpc.PeerCredentials(*_PEERCRED.unpack(raw))


class _AcceptStream:
    """One host Accept stream, as the dispatcher sees it."""

    def __init__(
        self,
        number: int,
        stream: ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest],
        announced: frozenset[str] | None,
    ) -> None:
        self.number = number
        self.stream = stream
        self.announced = announced
        self.unanswered: dict[str, _Pending] = {}
        # Done when the stream must end: None for shutdown, else why it failed.
        self.ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def end(self, why: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(why)

    def serves(self, forward_id: str) -> bool:
        return self.announced is not None and forward_id in self.announced

    def __str__(self) -> str:
        return f"accept_stream={self.number}"


class _Pending:
    """A container connection waiting for its host's ConnectResult."""

    __slots__ = ("conn", "forward_id", "peer", "stream", "stream_id", "tried")

    def __init__(
        self,
        stream_id: str,
        forward_id: str,
        conn: socket.socket,
        peer: ttrpc.PeerCredentials | None,
    ) -> None:
        self.stream_id = stream_id
        self.forward_id = forward_id
        self.conn: socket.socket | None = conn
        self.peer = peer
        self.stream: _AcceptStream | None = None
        # Streams that said they do not know this forward; rarely any, so shared empty.
        self.tried: frozenset[_AcceptStream] = frozenset()

    def __str__(self) -> str:
        # Logged as "%s" % pending: formatted only when the line is emitted.
        ids = f"stream_id={self.stream_id} forward_id={self.forward_id}"
        if self.peer is None:
            return ids
        return f"{ids} pid={self.peer.pid} uid={self.peer.uid} gid={self.peer.gid}"


@dataclass
class _Forward:
    forward_id: str
    path: str
    listener: transport.Listener


def _path_key(path: str) -> str:
    return os.path.normpath(path)


def _bind_error(index: int, sock: pb.Socket, problem: str) -> str:
    return (
        f"sockets[{index}] (forward_id={sock.forward_id!r} socket_path={sock.socket_path!r}): "
        f"{problem}"
    )


def _validate(request: pb.BindRequest) -> None:
    """INVALID_ARGUMENT naming the first bad entry; nothing is touched before this passes."""
    ids: dict[str, int] = {}
    paths: dict[str, int] = {}
    for i, sock in enumerate(request.sockets):
        path = sock.socket_path
        problem = None
        if not sock.forward_id:
            problem = "forward_id is empty"
        elif not path:
            problem = "socket_path is empty"
        elif "\0" in path:
            problem = "socket_path contains a NUL byte"
        elif not os.path.isabs(path):
            problem = "socket_path is not absolute"
        elif len(os.fsencode(path)) > transport.MAX_UNIX_PATH:
            problem = (
                f"socket_path is {len(os.fsencode(path))} bytes, longer than the "
                f"{transport.MAX_UNIX_PATH} bytes sun_path can hold"
            )
        elif path.endswith("/"):
            problem = "socket_path names a directory"
        elif sock.forward_id in ids:
            problem = f"forward_id repeats sockets[{ids[sock.forward_id]}]"
        elif _path_key(path) in paths:
            problem = f"socket_path repeats sockets[{paths[_path_key(path)]}]"
        if problem is not None:
            raise ttrpc.TtrpcError(ttrpc.Code.INVALID_ARGUMENT, _bind_error(i, sock, problem))
        ids[sock.forward_id] = i
        paths[_path_key(path)] = i


class Service(SocketForwardBase):
    """The VM-side SocketForward service (``nerdbox.services.socketforward.v1``).

    Owns *streams* when it can be closed (``StreamRegistry``): :meth:`shutdown`
    closes it. Register on a ttrpc server with :meth:`register`.
    """

    def __init__(
        self,
        streams: StreamManager,
        *,
        socket_mode: int = 0o666,
        max_unanswered_per_stream: int = 32,
        pending_limit: int = 4096,
        pending_timeout: float = 30.0,
        stream_wait: float = 5.0,
    ) -> None:
        if max_unanswered_per_stream < 1:
            raise ValueError("max_unanswered_per_stream must be >= 1")
        if pending_limit < 0:
            raise ValueError("pending_limit must be >= 0")
        if pending_timeout <= 0:
            raise ValueError("pending_timeout must be > 0")
        self._streams = streams
        self._socket_mode = socket_mode
        self._max_unanswered = max_unanswered_per_stream
        self._pending_limit = pending_limit
        self._pending_timeout = pending_timeout
        self._stream_wait = stream_wait
        self._forwards: dict[str, _Forward] = {}
        self._paths: dict[str, str] = {}  # normalised path -> forward_id
        self._bind_lock = asyncio.Lock()
        self._accept_streams: list[_AcceptStream] = []
        self._queue: collections.OrderedDict[str, _Pending] = collections.OrderedDict()
        self._deadlines: Deadlines[_Pending] = Deadlines(pending_timeout, self._on_timeout)
        self._timed_out: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._relays: set[relay.Relay] = set()
        self._stats: dict[str, ForwardStats] = {}
        self._stream_numbers = itertools.count(1)
        self._pipes = relay.PipePool()  # splice pipes shared by every relay
        self._closed = False

    # -- public -------------------------------------------------------------

    def register(self, server: ttrpc.Server) -> None:
        """Serve this service on *server* under its proto service name."""
        server.register(self)

    def stats(self) -> dict[str, ForwardStats]:
        """Counts per forward_id (copies)."""
        return {k: replace(v, failed=dict(v.failed)) for k, v in self._stats.items()}

    def bound(self) -> dict[str, str]:
        """forward_id -> socket path of every listener in place."""
        return {f.forward_id: f.path for f in self._forwards.values()}

    @property
    def pending(self) -> int:
        """Connections waiting for a host answer (queued or sent)."""
        return len(self._queue) + sum(len(s.unanswered) for s in self._accept_streams)

    async def shutdown(self) -> None:
        """Stop listeners and remove their files, fail pending connections, end
        relays and Accept streams, close the stream manager. Idempotent."""
        if self._closed:
            return
        self._closed = True
        log.info("service shutting down forwards=%d", len(self._forwards))
        async with self._bind_lock:
            for fwd in list(self._forwards.values()):
                fwd.listener.close()  # stops accepting, removes the file
            self._forwards.clear()
            self._paths.clear()
        for s in list(self._accept_streams):
            for p in list(s.unanswered.values()):
                self._fail(p, "shutdown", "service shutting down")
            s.end(None)
        for p in list(self._queue.values()):
            self._fail(p, "shutdown", "service shutting down")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for running in list(self._relays):
            running.close()
        self._pipes.close()
        if isinstance(self._streams, _ClosableStreamManager):
            await self._streams.close()
        log.info("service stopped")

    # -- Bind / Unbind ------------------------------------------------------
    # The RPC names are fixed by the proto; the Pythonic names are aliases
    # for callers in this process (context may be None there).

    async def Bind(self, request: pb.BindRequest, context: ttrpc.CallContext) -> empty_pb2.Empty:
        _validate(request)
        async with self._bind_lock:
            if self._closed:
                raise ttrpc.TtrpcError(ttrpc.Code.UNAVAILABLE, "socketforward: shutting down")
            todo: list[tuple[str, str]] = []
            for i, sock in enumerate(request.sockets):
                if self._already_bound(i, sock):
                    continue
                todo.append((sock.forward_id, sock.socket_path))
            created: list[_Forward] = []
            made_dirs: list[str] = []
            try:
                for forward_id, path in todo:
                    made_dirs += _make_parents(os.path.dirname(path))
                    listener = await self._listen(forward_id, path)
                    created.append(_Forward(forward_id, path, listener))
            except BaseException:
                for fwd in created:
                    fwd.listener.close()
                for d in reversed(made_dirs):
                    with contextlib.suppress(OSError):
                        os.rmdir(d)
                raise
            for fwd in created:
                self._forwards[fwd.forward_id] = fwd
                self._paths[_path_key(fwd.path)] = fwd.forward_id
                self._stats.setdefault(fwd.forward_id, ForwardStats())
                self._start_accepting(fwd)
                log.info(
                    "listening forward_id=%s socket_path=%s mode=%o",
                    fwd.forward_id,
                    fwd.path,
                    self._socket_mode,
                )
        return empty_pb2.Empty()

    def _already_bound(self, index: int, sock: pb.Socket) -> bool:
        fwd = self._forwards.get(sock.forward_id)
        owner = self._paths.get(_path_key(sock.socket_path))
        if fwd is not None and _path_key(fwd.path) == _path_key(sock.socket_path):
            return True  # idempotent re-Bind
        if fwd is not None:
            raise ttrpc.TtrpcError(
                ttrpc.Code.ALREADY_EXISTS,
                _bind_error(index, sock, f"forward_id is already bound at {fwd.path}"),
            )
        if owner is not None:
            raise ttrpc.TtrpcError(
                ttrpc.Code.ALREADY_EXISTS,
                _bind_error(index, sock, f"socket_path is already bound by forward_id {owner}"),
            )
        return False

    async def _listen(self, forward_id: str, path: str) -> transport.Listener:
        prefix = f"binding socket forward listener at {path} (forward_id={forward_id})"
        try:
            return await transport.listen(transport.UnixEndpoint(path), mode=self._socket_mode)
        except (transport.NotASocketError, transport.EndpointInUseError) as exc:
            raise ttrpc.TtrpcError(ttrpc.Code.ALREADY_EXISTS, f"{prefix}: {exc}") from None
        except PermissionError as exc:
            raise ttrpc.TtrpcError(ttrpc.Code.PERMISSION_DENIED, f"{prefix}: {exc}") from None
        except OSError as exc:
            raise ttrpc.TtrpcError(ttrpc.Code.INTERNAL, f"{prefix}: {exc}") from None

    async def Unbind(
        self, request: pb.UnbindRequest, context: ttrpc.CallContext
    ) -> empty_pb2.Empty:
        async with self._bind_lock:
            for forward_id in request.forward_ids:
                fwd = self._forwards.pop(forward_id, None)
                if fwd is None:
                    log.info("unbind: not bound forward_id=%s", forward_id)
                    continue
                self._paths.pop(_path_key(fwd.path), None)
                fwd.listener.close()  # stops accepting, removes the file
                log.info("unbound forward_id=%s socket_path=%s", forward_id, fwd.path)
        return empty_pb2.Empty()

    async def bind(self, request: pb.BindRequest, context: ttrpc.CallContext | None = None) -> None:
        """Python spelling of :meth:`Bind`."""
        await self.Bind(
            request, context or ttrpc.CallContext(SocketForwardBase.SERVICE_NAME, "Bind")
        )

    async def unbind(
        self, request: pb.UnbindRequest, context: ttrpc.CallContext | None = None
    ) -> None:
        """Python spelling of :meth:`Unbind`."""
        await self.Unbind(
            request, context or ttrpc.CallContext(SocketForwardBase.SERVICE_NAME, "Unbind")
        )

    # -- container connections ------------------------------------------------

    def _start_accepting(self, fwd: _Forward) -> None:
        forward_id = fwd.forward_id

        def failed(exc: OSError) -> None:
            log.warning(
                "accept failed forward_id=%s socket_path=%s error=%r", forward_id, fwd.path, exc
            )

        fwd.listener.start_accepting(
            lambda conn: self._on_connection(forward_id, conn), failed, backoff=_ACCEPT_BACKOFF
        )

    def _on_connection(self, forward_id: str, conn: socket.socket) -> None:
        p = _Pending(generate_stream_id(STREAM_ID_PREFIX), forward_id, conn, _peer_of(conn))
        self._stats[forward_id].accepted += 1
        log.debug("connection accepted %s", p)
        if self._closed:
            self._fail(p, "shutdown", "service shutting down")
            return
        self._queue[p.stream_id] = p
        self._dispatch()
        if p.stream is None and len(self._queue) > self._pending_limit:
            # No stream took it and the waiting room is full.
            self._fail(p, "queue_full", f"pending queue full limit={self._pending_limit}")
            return
        self._deadlines.add(p)

    def _on_timeout(self, p: _Pending) -> None:
        where = "queued" if p.stream is None else f"sent on {p.stream}"
        if p.stream is not None:
            # Remember it, so a late answer is recognised (and its stream closed).
            self._timed_out[p.stream_id] = None
            while len(self._timed_out) > 4 * self._pending_limit + 64:
                self._timed_out.popitem(last=False)
        self._fail(
            p, "timeout", f"no answer from the host within {self._pending_timeout}s ({where})"
        )
        self._dispatch()

    def _fail(self, p: _Pending, reason: str, detail: str) -> None:
        """Close a connection that will not be relayed; one log line says why."""
        if p.conn is None:
            return
        self._deadlines.discard(p)
        self._queue.pop(p.stream_id, None)
        if p.stream is not None:
            p.stream.unanswered.pop(p.stream_id, None)
            p.stream = None
        p.conn.close()
        p.conn = None
        stats = self._stats.setdefault(p.forward_id, ForwardStats())
        stats.failed[reason] = stats.failed.get(reason, 0) + 1
        log.warning("connection closed %s reason=%s detail=%r", p, reason, detail)

    # -- routing ----------------------------------------------------------------

    def _candidates(self, p: _Pending) -> list[_AcceptStream]:
        """Streams that may serve *p*: those announcing its forward_id, else the
        un-announced ones that have not yet said they do not know it."""
        live = [s for s in self._accept_streams if not s.ended.done()]
        announcing = [s for s in live if s.serves(p.forward_id)]
        if announcing:
            return announcing
        return [s for s in live if s.announced is None and s not in p.tried]

    def _dispatch(self) -> None:
        """Hand queued requests, oldest first, to streams with room."""
        if not self._queue or not self._accept_streams:
            return
        room = {s: self._max_unanswered - len(s.unanswered) for s in self._accept_streams}
        free = sum(max(0, r) for r in room.values())
        placed: list[tuple[_Pending, _AcceptStream]] = []
        # Forwards whose every candidate is full: later requests for them are
        # skipped without looking (keeps a long queue cheap to walk).
        no_room: set[str] = set()
        for p in self._queue.values():
            if free <= 0:
                break
            if p.forward_id in no_room:
                continue
            candidates = self._candidates(p)
            best: _AcceptStream | None = None
            for s in candidates:
                if room[s] > 0 and (best is None or room[s] > room[best]):
                    best = s
            if best is not None:
                room[best] -= 1
                free -= 1
                placed.append((p, best))
            elif not p.tried or (candidates and candidates[0].serves(p.forward_id)):
                no_room.add(p.forward_id)
        for p, s in placed:
            del self._queue[p.stream_id]
            p.stream = s
            s.unanswered[p.stream_id] = p
            if s.ended.done():
                continue  # failed earlier in this pass: retiring it requeues p
            # No task per stream: the window of unanswered requests bounds
            # what can pile up in the transport.
            try:
                s.stream.send_nowait(
                    pb.ConnectRequest(stream_id=p.stream_id, forward_id=p.forward_id)
                )
            except (ttrpc.TtrpcError, ttrpc.StreamClosedError) as exc:
                s.end(exc)
                continue
            log.debug("connect request sent %s %s", s, p)

    # -- Accept -----------------------------------------------------------------

    async def Accept(self, stream: ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest]) -> None:
        if self._closed:
            raise ttrpc.TtrpcError(ttrpc.Code.UNAVAILABLE, "socketforward: shutting down")
        announced = _announced(stream.context)
        s = _AcceptStream(next(self._stream_numbers), stream, announced)
        peer = stream.context.peer
        log.info(
            "accept stream opened %s forward_ids=%s%s",
            s,
            "-" if announced is None else ",".join(sorted(announced)),
            "" if peer is None else f" pid={peer.pid} uid={peer.uid} gid={peer.gid}",
        )
        self._accept_streams.append(s)
        loop = asyncio.get_running_loop()
        receiver = loop.create_task(self._recv_loop(s))
        how = "ended"
        try:
            self._dispatch()
            waiting: set[asyncio.Future[Any]] = {receiver, s.ended}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done and receiver.exception() is not None:
                how = f"failed error={receiver.exception()!r}"
            elif receiver in done:
                how = "closed by the host"
            elif s.ended.result() is not None:
                how = f"failed error={s.ended.result()!r}"
            else:
                how = "ended by shutdown"
        except asyncio.CancelledError:
            how = "cancelled (rpc connection lost)"
            raise
        finally:
            receiver.cancel()
            # Retire before awaiting anything: a second cancellation (the RPC
            # connection dropping right after the host closed this stream) would
            # otherwise skip it and strand the stream's requests for good.
            self._retire(s)
            log.info("accept stream %s %s handed_back=%d", how, s, len(s.unanswered))
            s.unanswered.clear()
            self._dispatch()
            await asyncio.gather(receiver, return_exceptions=True)

    async def accept(self, stream: ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest]) -> None:
        """Python spelling of :meth:`Accept`."""
        await self.Accept(stream)

    def _retire(self, s: _AcceptStream) -> None:
        """A stream ended: its unanswered requests go back to the front of the queue."""
        with contextlib.suppress(ValueError):
            self._accept_streams.remove(s)
        back = [p for p in s.unanswered.values() if p.conn is not None]
        for p in reversed(back):
            p.stream = None
            if self._try_claim_now(p):
                continue
            if self._closed:
                self._fail(p, "shutdown", "service shutting down")
                continue
            self._queue[p.stream_id] = p
            self._queue.move_to_end(p.stream_id, last=False)

    def _try_claim_now(self, p: _Pending) -> bool:
        # The host opens the data stream before answering success: if it is
        # there, the answer was lost with the stream, not the connection.
        try:
            data = self._streams.get(p.stream_id)
        except LookupError:
            return False
        self._start_relay(p, data)
        return True

    async def _recv_loop(self, s: _AcceptStream) -> None:
        async for result in s.stream:
            self._on_result(s, result)

    def _on_result(self, s: _AcceptStream, result: pb.ConnectResult) -> None:
        p = s.unanswered.pop(result.stream_id, None)
        if p is None:
            late = result.stream_id in self._timed_out
            if late and not result.error:
                # The host opened a data stream nobody will claim now: close it.
                with contextlib.suppress(LookupError):
                    self._streams.get(result.stream_id).close()
            log.warning(
                "connect result for unknown stream ignored %s stream_id=%s error=%r%s",
                s,
                result.stream_id,
                result.error,
                " (answered after the timeout)" if late else "",
            )
            return
        p.stream = None
        if not result.error:
            self._dispatch()
            self._start_relay(p, None)
            return
        if result.error.startswith(UNKNOWN_FORWARD_ID) and not s.serves(p.forward_id):
            p.tried = p.tried | {s}
            if self._candidates(p) and p.conn is not None:
                log.info("host stream does not know forward, trying another %s %s", s, p)
                self._queue[p.stream_id] = p
                self._queue.move_to_end(p.stream_id, last=False)
                self._dispatch()
                return
            self._fail(p, "unknown_forward", result.error)
        else:
            self._fail(p, "host_error", result.error)
        self._dispatch()

    # -- relaying ----------------------------------------------------------------

    def _start_relay(self, p: _Pending, data: socket.socket | None) -> None:
        self._deadlines.discard(p)
        conn, p.conn = p.conn, None
        if conn is None:
            if data is not None:
                data.close()
            return
        if data is None:
            # The host opens the data stream before answering, so it is
            # usually registered already: no task needed to wait for it.
            with contextlib.suppress(LookupError):
                data = self._streams.get(p.stream_id)
        if data is not None:
            self._begin_relay(p, conn, data)
            return
        task = asyncio.get_running_loop().create_task(self._claim_and_relay(p, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, stream_id: str) -> socket.socket:
        try:
            return self._streams.get(stream_id)
        except LookupError:
            if not isinstance(self._streams, _WaitingStreamManager):
                raise
        return await self._streams.wait_for(stream_id, self._stream_wait)

    async def _claim_and_relay(self, p: _Pending, conn: socket.socket) -> None:
        stats = self._stats.setdefault(p.forward_id, ForwardStats())
        try:
            data = await self._claim(p.stream_id)
        except Exception as exc:
            # LookupError: the host said success but no data stream came.
            conn.close()
            stats.failed["no_stream"] = stats.failed.get("no_stream", 0) + 1
            log.warning("connection closed %s reason=no_stream detail=%r", p, str(exc))
            return
        except BaseException:
            conn.close()
            stats.failed["shutdown"] = stats.failed.get("shutdown", 0) + 1
            log.warning("connection closed %s reason=shutdown", p)
            raise
        self._begin_relay(p, conn, data)

    def _begin_relay(self, p: _Pending, conn: socket.socket, data: socket.socket) -> None:
        """Relay on callbacks, no task: an idle connection costs only its relay."""
        stats = self._stats.setdefault(p.forward_id, ForwardStats())
        stats.connected += 1
        stats.active += 1
        log.debug("relaying %s", p)

        def done(result: relay.RelayStats) -> None:
            self._relays.discard(running)
            stats.active -= 1
            stats.bytes_to_host += result.bytes_a_to_b
            stats.bytes_from_host += result.bytes_b_to_a
            if result.ended == "cancelled":
                log.info("connection ended by shutdown %s", p)
                return
            log.info(
                "connection done %s ended=%s to_host=%d from_host=%d duration=%.3f%s",
                p,
                result.ended,
                result.bytes_a_to_b,
                result.bytes_b_to_a,
                result.duration,
                f" error={result.error!r}" if result.error else "",
            )

        running = relay.Relay(conn, data, pipes=self._pipes, on_done=done)
        self._relays.add(running)
        with contextlib.suppress(Exception):  # on_done has logged it; sockets are closed
            running.start()


def _announced(context: ttrpc.CallContext) -> frozenset[str] | None:
    values = context.get(FORWARD_IDS_METADATA)
    ids = frozenset(i.strip() for v in values for i in v.split(",") if i.strip())
    return ids or None


def _make_parents(directory: str) -> list[str]:
    """Create missing parents 0755 (container users must reach the socket);
    returns the ones created, outermost first."""
    missing: list[str] = []
    d = directory
    while d and not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    created: list[str] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            if stat.S_ISDIR(os.stat(d).st_mode):
                continue
            raise
        os.chmod(d, 0o755)  # mkdir's mode is filtered by the umask
        created.append(d)
    return created


# -- the agent -------------------------------------------------------------------


# Dial errors that retrying cannot fix.
_FATAL_DIAL_ERRNOS: Final = frozenset(
    {errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EINVAL}
)


class Agent:
    """Runs a :class:`Service` on its RPC connection(s).

    Dial mode (nerdbox's direction): dial *rpc_dial*, serve ttrpc on that one
    connection, dial again with jittered capped backoff when it drops; the
    Service (listeners, queue, relays) lives on. Listen mode: serve every
    connection accepted on *rpc_listen*.
    """

    def __init__(
        self,
        service: Service,
        *,
        rpc_dial: transport.Endpoint | None = None,
        rpc_listen: transport.Endpoint | None = None,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if (rpc_dial is None) == (rpc_listen is None):
            raise ValueError("exactly one of rpc_dial and rpc_listen")
        self.service = service
        self._dial = rpc_dial
        self._listen = rpc_listen
        self._backoff = transport.Backoff(backoff_initial, backoff_max)
        self._connect_timeout = connect_timeout
        self._server = ttrpc.Server()
        service.register(self._server)

    async def run(self) -> None:
        """Serve until cancelled; raises OSError when the RPC endpoint is unusable."""
        if self._dial is not None:
            await self._dial_loop(self._dial)
        else:
            assert self._listen is not None
            await self._listen_loop(self._listen)

    async def _dial_loop(self, ep: transport.Endpoint) -> None:
        attempt = 0
        first = True
        while True:
            try:
                sock = await transport.connect(ep, timeout=self._connect_timeout)
            except (OSError, TimeoutError) as exc:
                if first and isinstance(exc, OSError) and exc.errno in _FATAL_DIAL_ERRNOS:
                    raise
                delay = self._backoff.next()
                attempt += 1
                log.warning(
                    "rpc dial failed endpoint=%s attempt=%d error=%r retry_in=%.2fs",
                    ep,
                    attempt,
                    str(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            first = False
            log.info("rpc connected endpoint=%s", ep)
            started = time.monotonic()
            await self._server.serve_connection(sock)
            # A connection that lived long enough resets the backoff.
            if time.monotonic() - started >= self._backoff.maximum:
                attempt = 0
                self._backoff.reset()
            delay = self._backoff.next()
            attempt += 1
            log.warning("rpc connection lost endpoint=%s redial_in=%.2fs", ep, delay)
            await asyncio.sleep(delay)

    async def _listen_loop(self, ep: transport.Endpoint) -> None:
        listener = await transport.listen(ep, mode=0o600)
        log.info("rpc listening endpoint=%s", ep)
        try:
            await self._server.serve(listener.sock)
        finally:
            listener.close()

    async def shutdown(self, grace: float = 1.0) -> None:
        """Shut the service down (files removed), then the ttrpc server."""
        await self.service.shutdown()
        await self._server.shutdown(grace)


# -- command line ---------------------------------------------------------------


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range 0..777")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "guest",
        help="run the VM-side agent (SocketForward service)",
        description="The VM side: serve SocketForward on the RPC connection and accept "
        "data streams; forward container connections to the host. SIGTERM/SIGINT "
        "stop it cleanly; SIGUSR1 logs the statistics.",
    )
    rpc = parser.add_mutually_exclusive_group()
    rpc.add_argument(
        "--rpc-dial",
        metavar="URI",
        help=f"dial the host and serve ttrpc on that connection (default {DEFAULT_RPC_DIAL})",
    )
    rpc.add_argument("--rpc-listen", metavar="URI", help="listen for the host's RPC connections")
    parser.add_argument(
        "--streams",
        metavar="URI",
        default=DEFAULT_STREAMS,
        help=f"where the host opens data streams (default {DEFAULT_STREAMS})",
    )
    parser.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o666,
        metavar="OCTAL",
        help="mode of the forwarded socket files (default 666)",
    )
    parser.add_argument(
        "--max-unanswered",
        type=_positive_int,
        default=32,
        metavar="N",
        help="ConnectRequests unanswered at once per Accept stream (default 32)",
    )
    parser.add_argument(
        "--pending-limit",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="connections waiting for a free Accept stream (default 4096)",
    )
    parser.add_argument(
        "--pending-timeout",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="close a connection the host has not answered within this (default 30)",
    )
    parser.set_defaults(run=main)


@dataclass(frozen=True)
class AgentConfig:
    """What ``socketforward guest`` was asked to do, endpoints parsed."""

    rpc_dial: transport.Endpoint | None
    rpc_listen: transport.Endpoint | None
    streams: transport.Endpoint
    socket_mode: int
    max_unanswered: int
    pending_limit: int
    pending_timeout: float


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Endpoints parsed and checked for their use; EndpointError names the option."""

    def parse(option: str, uri: str, *, listening: bool) -> transport.Endpoint:
        try:
            ep = transport.parse_endpoint(uri)
        except transport.EndpointError as exc:
            raise transport.EndpointError(f"{option}: {exc}") from None
        if listening and isinstance(ep, transport.HvsockEndpoint):
            raise transport.EndpointError(f"{option}: cannot listen on hvsock endpoint {uri!r}")
        if not listening and isinstance(ep, transport.VsockEndpoint) and ep.cid is None:
            raise transport.EndpointError(f"{option}: dialing {uri!r} needs a CID")
        return ep

    rpc_dial = rpc_listen = None
    if args.rpc_listen is not None:
        rpc_listen = parse("--rpc-listen", args.rpc_listen, listening=True)
    else:
        rpc_dial = parse("--rpc-dial", args.rpc_dial or DEFAULT_RPC_DIAL, listening=False)
    return AgentConfig(
        rpc_dial=rpc_dial,
        rpc_listen=rpc_listen,
        streams=parse("--streams", args.streams, listening=True),
        socket_mode=args.socket_mode,
        max_unanswered=args.max_unanswered,
        pending_limit=args.pending_limit,
        pending_timeout=args.pending_timeout,
    )


def _raise_fd_limit() -> None:
    # Every forwarded connection holds several fds; bursts need thousands.
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource  # noqa: PLC0415

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _log_stats(service: Service) -> None:
    """One line per forward (SIGUSR1, and at exit), as the host's."""
    for fid, st in sorted(service.stats().items()):
        failed = ",".join(f"{k}:{v}" for k, v in sorted(st.failed.items())) or "none"
        log.info(
            "stats forward_id=%s accepted=%d connected=%d active=%d failed=%s to_host=%d "
            "from_host=%d",
            fid,
            st.accepted,
            st.connected,
            st.active,
            failed,
            st.bytes_to_host,
            st.bytes_from_host,
        )
    log.info("stats pending=%d", service.pending)


class _Fatal(Exception):
    """An endpoint the agent cannot use; the message says which and why."""


async def _serve(cfg: AgentConfig) -> None:
    try:
        streams_listener = await transport.listen(cfg.streams, mode=0o600)
    except (OSError, transport.EndpointError) as exc:
        raise _Fatal(f"--streams {cfg.streams}: {exc}") from None
    registry = StreamRegistry(streams_listener)
    service = Service(
        registry,
        socket_mode=cfg.socket_mode,
        max_unanswered_per_stream=cfg.max_unanswered,
        pending_limit=cfg.pending_limit,
        pending_timeout=cfg.pending_timeout,
    )
    agent = Agent(service, rpc_dial=cfg.rpc_dial, rpc_listen=cfg.rpc_listen)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    for sig in signals[:2]:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _log_stats, service)
    registry.start()
    log.info(
        "guest started rpc=%s streams=%s",
        f"dial {cfg.rpc_dial}" if cfg.rpc_dial is not None else f"listen {cfg.rpc_listen}",
        cfg.streams,
    )
    runner = loop.create_task(agent.run())
    stopper = loop.create_task(stop.wait())
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done() and not runner.cancelled() and runner.exception() is not None:
            error = runner.exception()
            option = "--rpc-dial" if cfg.rpc_dial is not None else "--rpc-listen"
            raise _Fatal(f"{option} {cfg.rpc_dial or cfg.rpc_listen}: {error}")
        log.info("signal received, shutting down")
    finally:
        for task in (runner, stopper):
            task.cancel()
        await asyncio.gather(runner, stopper, return_exceptions=True)
        await agent.shutdown()
        for sig in signals:
            loop.remove_signal_handler(sig)
        _log_stats(service)


def main(args: argparse.Namespace) -> int:
    """``socketforward guest``: 0 after a clean shutdown, 2 for bad arguments,
    1 for an endpoint it cannot use."""
    try:
        cfg = config_from_args(args)
    except transport.EndpointError as exc:
        print(f"socketforward guest: {exc}", file=sys.stderr)
        return 2
    _raise_fd_limit()
    try:
        runner.run(_serve(cfg))
    except _Fatal as exc:
        print(f"socketforward guest: {exc}", file=sys.stderr)
        return 1
    return 0
