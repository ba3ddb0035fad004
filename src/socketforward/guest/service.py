"""The VM-side SocketForward service (``nerdbox.services.socketforward.v1``).

Wire-compatible with nerdbox's vminitd socket-forward plugin
(docs/protocol.md 4): ``Bind`` creates UNIX
listeners; each accepted container connection gets a stream id and a
``ConnectRequest`` on an ``Accept`` call; on a successful ``ConnectResult``
the data stream of that id is claimed and relayed.

This module does the I/O: listeners, Accept calls, claiming data streams,
relays. Where each connection goes is decided by the sans-IO
:class:`~socketforward.guest.dispatch.Dispatcher`, for which the service is
the sink. How many container connections may be open at once is the
:class:`~socketforward.guest.budget.Budget`'s call: while it is spent, no
forward listener accepts (docs/protocol.md 4.7).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import functools
import itertools
import logging
import select
import socket
from collections.abc import Callable, Iterable
from typing import Any, Final, NoReturn, Protocol

from google.protobuf import empty_pb2

import ttrpc_asyncio as ttrpc
from socketforward import relay, transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardBase
from socketforward.datastream import POOLED_PREFIX
from socketforward.deadlines import Deadlines
from socketforward.ends import EndRegistry
from socketforward.guest.bind import (
    BindError,
    BindTable,
    Bound,
    create_listeners,
    validate,
)
from socketforward.guest.budget import Budget, BudgetStats, FdPlan
from socketforward.guest.dispatch import Dispatcher, Failure, HostCall, Pending, State
from socketforward.logs import RateLimitedLog, escape
from socketforward.protocol import (
    FORWARD_IDS_METADATA,
    PICK_POOLED_METADATA,
    STREAM_ID_PREFIX,
    announced_forward_ids,
    generate_stream_id,
    valid_stream_id,
)
from socketforward.stats import ForwardStats

__all__ = ["PooledStreams", "Service", "StreamManager"]

log = logging.getLogger("socketforward.guest")

# How long accepting pauses after an accept() error (EMFILE...) instead of spinning.
_ACCEPT_BACKOFF = 0.1

# A VM socket the host asked for that could not be dialed: errno -> status.
_DIAL_CODES: Final = {
    errno.ENOENT: ttrpc.Code.NOT_FOUND,
    errno.ECONNREFUSED: ttrpc.Code.UNAVAILABLE,
    errno.EACCES: ttrpc.Code.PERMISSION_DENIED,
    errno.EPERM: ttrpc.Code.PERMISSION_DENIED,
    errno.ENOTSOCK: ttrpc.Code.FAILED_PRECONDITION,
    errno.EPROTOTYPE: ttrpc.Code.FAILED_PRECONDITION,
    errno.ENOTDIR: ttrpc.Code.NOT_FOUND,
    errno.EMFILE: ttrpc.Code.RESOURCE_EXHAUSTED,
    errno.ENFILE: ttrpc.Code.RESOURCE_EXHAUSTED,
    errno.ENOBUFS: ttrpc.Code.RESOURCE_EXHAUSTED,
    errno.ENOMEM: ttrpc.Code.RESOURCE_EXHAUSTED,
}
# ... and status -> the failure reason counted in the expose's stats.
_DIAL_REASONS: Final = {
    ttrpc.Code.NOT_FOUND: "not_found",
    ttrpc.Code.UNAVAILABLE: "refused",
    ttrpc.Code.PERMISSION_DENIED: "denied",
    ttrpc.Code.FAILED_PRECONDITION: "not_a_socket",
    ttrpc.Code.RESOURCE_EXHAUSTED: "exhausted",
    ttrpc.Code.DEADLINE_EXCEEDED: "timeout",
    ttrpc.Code.INVALID_ARGUMENT: "invalid",
}


class StreamManager(Protocol):
    """Hands out data streams by id, each exactly once.

    ``get`` raises a ``LookupError`` (``StreamNotFound``) for an unknown or
    already-claimed id; ``wait_for`` waits a bounded time for a stream still
    on its way; ``close`` ends it. :class:`~socketforward.datastream.StreamRegistry`
    is the one the agent uses.
    """

    def get(self, stream_id: str) -> socket.socket: ...

    async def wait_for(self, stream_id: str, timeout: float) -> socket.socket: ...

    async def close(self) -> None: ...


class PooledStreams(Protocol):
    """Where the host's pooled data streams wait (docs/protocol.md 5.6):
    :class:`~socketforward.datastream.StreamRegistry`."""

    max_pooled: int

    def drop_pooled(self) -> int:
        """Close the pooled streams nobody claimed."""

    def take_pooled(self, prefix: str) -> tuple[str, socket.socket] | None:
        """A pooled stream whose id starts with *prefix*, and its id, for the
        guest to relay on at once; None when there is none."""


class _AcceptCall(HostCall["_Connection"]):
    """A host Accept call with its ttrpc stream."""

    def __init__(
        self,
        number: int,
        stream: ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest],
        announced: frozenset[str] | None,
        *,
        pick_prefix: str = "",
    ) -> None:
        super().__init__(number, announced)
        self.stream = stream
        self.pick_prefix = pick_prefix
        """The start of the ids of the host's pooled streams, when it relays one
        a request names (5.6): pick one of those; "" when it does not."""
        # Done when the call must end: None for shutdown, else why it failed.
        self.ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def end(self, why: Exception | None) -> None:
        self.live = False
        if not self.ended.done():
            self.ended.set_result(why)


class _Connection(Pending):
    """A container connection waiting for its host's answer; owns *conn* until
    it is relayed or closed."""

    __slots__ = ("conn", "data_stream_id", "ends_channel", "peer", "relay")

    def __init__(
        self, forward_id: str, conn: socket.socket, peer: ttrpc.PeerCredentials | None
    ) -> None:
        super().__init__(generate_stream_id(STREAM_ID_PREFIX), forward_id)
        self.conn: socket.socket | None = conn
        self.peer = peer
        self.ends_channel = 0
        """The StreamEnds call the host's answer named (0: ends as shutdowns)."""
        self.data_stream_id = ""
        """The pooled stream this connection relays on (5.6); "": stream_id's own."""
        self.relay: relay.Relay | None = None
        """Relaying already on a pooled stream the guest picked, the answer awaited."""

    @property
    def data_stream(self) -> str:
        """The id of the data stream this connection relays on."""
        return self.data_stream_id or self.stream_id

    def __str__(self) -> str:
        # Logged as "%s" % connection: formatted only when the line is emitted.
        ids = f"stream_id={self.stream_id} forward_id={self.forward_id}"
        if self.peer is None:
            return ids
        return f"{ids} pid={self.peer.pid} uid={self.peer.uid} gid={self.peer.gid}"


class _Dialed:
    """A connection the host had dialed, as log lines name it: escaped only
    when a line is written (every Dial has one, few are logged)."""

    __slots__ = ("expose_id", "path", "stream_id")

    def __init__(self, stream_id: str, expose_id: str, path: str) -> None:
        self.stream_id = stream_id
        self.expose_id = expose_id
        self.path = path

    def __str__(self) -> str:
        return (
            f"stream_id={escape(self.stream_id)} expose_id={escape(self.expose_id)} "
            f"socket_path={escape(self.path)}"
        )


def _dial_error(path: str, exc: OSError) -> ttrpc.TtrpcError:
    """The status for a VM socket *path* that could not be dialed."""
    code = _DIAL_CODES.get(exc.errno or 0, ttrpc.Code.UNAVAILABLE)
    return ttrpc.TtrpcError(code, f"socketforward: dial {path!r}: {exc.strerror or exc}")


class _DialWait:
    """A Dial that must wait, until its task takes it over: it holds a budget
    share, and the data stream when that was claimed already."""

    __slots__ = ("data", "give_back", "request", "stats", "taken", "what")

    def __init__(
        self,
        what: _Dialed,
        request: pb.DialRequest,
        stats: ForwardStats,
        data: socket.socket | None,
        give_back: Callable[[], None],
    ) -> None:
        self.what, self.request, self.stats = what, request, stats
        self.data = data
        self.give_back = give_back
        self.taken = False

    def take(self) -> socket.socket | None:
        self.taken = True
        data, self.data = self.data, None
        return data

    def task_done(self, task: asyncio.Task[empty_pb2.Empty]) -> None:
        # A done callback, not a finally: a task cancelled before its first step
        # never runs its coroutine, which then took nothing over.
        if not self.taken:
            self.taken = True
            if self.data is not None:
                self.data.close()
                self.data = None
            self.give_back()
        if not task.cancelled():
            task.exception()  # retrieved: the server may have stopped awaiting it


class _RelayDone:
    """A relay's ``on_done``: slotted, not a closure (every idle connection
    holds one; a closure over these names cost about 0.25 KiB more)."""

    __slots__ = ("early", "running", "service", "stats", "what")

    def __init__(self, service: Service, what: object, stats: ForwardStats, *, early: bool) -> None:
        self.service = service
        self.what = what  # names the connection in the log
        self.stats = stats
        self.early = early  # started before the host's answer (5.6)
        self.running: relay.Relay | None = None  # set once the relay is made

    def __call__(self, result: relay.RelayStats) -> None:
        self.service.relay_done(self, result)


def _pick_prefix(values: list[str]) -> str:
    """The ids of the pooled streams an Accept call's host relays when a request
    names one (its metadata, 5.6); "" when it does not, or says it oddly."""
    tag = values[0] if len(values) == 1 else ""
    if not (0 < len(tag) <= 32 and tag.isascii() and tag.isalnum()):
        return ""
    return f"{POOLED_PREFIX}{tag}-"


def _peer_of(conn: socket.socket) -> ttrpc.PeerCredentials | None:
    try:
        return ttrpc.PeerCredentials.of(conn)
    except OSError:
        return None


class Service(SocketForwardBase):
    """The VM-side SocketForward service.

    Owns *streams*: :meth:`shutdown` closes it. Register on a ttrpc server with
    :meth:`register`; Python callers use :meth:`bind`, :meth:`unbind`,
    :meth:`accept`.

    *max_connections*: container connections open at once, waiting or relaying;
    at that many no forward listener accepts until one ends (docs/protocol.md
    4.7). *pipe_pool*: idle splice pipes kept for reuse. None plans either from
    the process's fd limit (:class:`~socketforward.guest.budget.FdPlan`).
    *fail_fast*: while no host Accept call is open, close new connections at
    once (reason ``no_host``) instead of letting them wait for one.
    *expose_allow*: glob patterns (fnmatch) of the VM socket paths a host may
    have dialed (Dial, docs/protocol.md 4.10); None allows any. *dial_timeout*:
    how long such a dial may take.
    """

    def __init__(
        self,
        streams: StreamManager,
        *,
        socket_mode: int = 0o600,
        max_unanswered_per_stream: int = 32,
        pending_limit: int = 4096,
        pending_timeout: float = 30.0,
        stream_wait: float = 5.0,
        max_connections: int | None = None,
        pipe_pool: int | None = None,
        fail_fast: bool = False,
        expose_allow: Iterable[str] | None = None,
        dial_timeout: float = 5.0,
        pooled_streams: PooledStreams | None = None,
    ) -> None:
        if pending_timeout <= 0:
            raise ValueError("pending_timeout must be > 0")
        if max_connections is None or pipe_pool is None:
            plan = FdPlan.current()
            max_connections = plan.max_connections if max_connections is None else max_connections
            pipe_pool = plan.pipe_pool if pipe_pool is None else pipe_pool
        self._streams = streams
        self._pooled = pooled_streams  # its limit goes in each StreamEnds hello (5.6)
        self._socket_mode = socket_mode
        self._stream_wait = stream_wait
        self._dispatcher: Dispatcher[_Connection, _AcceptCall] = Dispatcher(
            self,
            window=max_unanswered_per_stream,
            queue_limit=pending_limit,
            timeout=pending_timeout,
            fail_fast=fail_fast,
        )
        self._bound = BindTable()
        self._bind_lock = asyncio.Lock()
        self._deadlines: Deadlines[_Connection] = Deadlines(
            pending_timeout, self._dispatcher.expire
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._relays: set[relay.Relay] = set()
        self._stats: dict[str, ForwardStats] = {}
        self._call_numbers = itertools.count(1)
        # StreamEnds calls open now, by the number each hello gave (docs/protocol.md 5.5).
        self._ends_calls: dict[int, ttrpc.ServerStream[pb.StreamEnd, pb.StreamEnd]] = {}
        self._ends = EndRegistry(self._ends_calls.get)
        self._expose_stats: dict[str, ForwardStats] = {}
        self._expose_allow = None if expose_allow is None else tuple(expose_allow)
        self._dial_timeout = dial_timeout
        self._pipes = relay.PipePool(limit=pipe_pool)  # splice pipes shared by every relay
        self._budget = Budget(
            max_connections, pause=self._pause_accepting, resume=self._resume_accepting
        )
        # Containers can open (and abandon) connections at will.
        self._peer_log = RateLimitedLog(log)
        self._closed = False

    # -- public -------------------------------------------------------------

    def register(self, server: ttrpc.Server) -> None:
        """Serve this service on *server* under its proto service name."""
        server.register(self)

    def stats(self) -> dict[str, ForwardStats]:
        """Counts per forward_id (copies)."""
        return {k: v.copy() for k, v in self._stats.items()}

    def expose_stats(self) -> dict[str, ForwardStats]:
        """Counts per expose_id of the connections the host had dialed (copies)."""
        return {k: v.copy() for k, v in self._expose_stats.items()}

    def bound(self) -> dict[str, str]:
        """forward_id -> socket path of every listener in place."""
        return self._bound.paths()

    @property
    def accept_calls(self) -> int:
        """Host Accept calls open now."""
        return len(self._dispatcher.calls)

    @property
    def pending(self) -> int:
        """Connections waiting for a host answer (queued or sent)."""
        return self._dispatcher.pending

    def budget(self) -> BudgetStats:
        """The descriptor budget now: connections open, descriptors counted for
        them, and whether the forward listeners accept (a copy)."""
        return self._budget.stats()

    async def shutdown(self) -> None:
        """Stop listeners and remove their files, fail pending connections, end
        relays and Accept calls, close the stream manager. Idempotent."""
        if self._closed:
            return
        self._closed = True
        log.info("service shutting down forwards=%d", len(self._bound))
        async with self._bind_lock:
            for bound in self._bound:
                # Stops accepting, removes the file, then the directories Bind made.
                self._bound.remove(bound.forward_id)
        self._dispatcher.shutdown()
        for call in self._dispatcher.calls:
            call.end(None)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for running in list(self._relays):
            running.close()
        self._pipes.close()
        await self._streams.close()
        self._peer_log.flush()
        log.info("service stopped")

    # -- Bind / Unbind ------------------------------------------------------
    # The RPC names are fixed by the proto; the Pythonic names are aliases
    # for callers in this process (context may be None there).

    async def Bind(self, request: pb.BindRequest, context: ttrpc.CallContext) -> empty_pb2.Empty:
        try:
            await self._bind(request)
        except ttrpc.TtrpcError as exc:
            # One line per refused Bind (the ttrpc server logs no status a handler chose).
            code = exc.code.name if isinstance(exc.code, ttrpc.Code) else exc.code
            if isinstance(exc, BindError):
                log.warning(
                    "bind failed forward_id=%s socket_path=%s code=%s error=%r",
                    escape(exc.forward_id),
                    escape(exc.socket_path),
                    code,
                    exc.message,
                )
            else:
                log.warning(
                    "bind failed sockets=%d code=%s error=%r",
                    len(request.sockets),
                    code,
                    exc.message,
                )
            raise
        return empty_pb2.Empty()

    async def _bind(self, request: pb.BindRequest) -> None:
        validate(request)
        async with self._bind_lock:
            if self._closed:
                raise ttrpc.TtrpcError(ttrpc.Code.UNAVAILABLE, "socketforward: shutting down")
            plan = self._bound.plan(request, self._socket_mode)
            for same in plan.same:
                # A host Binds again before it announces again (reconnect, reload).
                self._dispatcher.forward_bound(same.forward_id)
            created, changed = await create_listeners(plan, self._socket_mode)
            for change in changed:
                bound = change.bound
                self._dispatcher.forward_bound(bound.forward_id)
                log.info(
                    "socket mode and owner changed forward_id=%s socket_path=%s "
                    "mode=%04o uid=%d gid=%d was_mode=%04o was_uid=%d was_gid=%d",
                    escape(bound.forward_id),
                    escape(bound.path),
                    bound.mode,
                    bound.uid,
                    bound.gid,
                    change.was.mode,
                    change.was.uid,
                    change.was.gid,
                )
            for bound in created:
                self._bound.add(bound)
                self._dispatcher.forward_bound(bound.forward_id)
                self._stats.setdefault(bound.forward_id, ForwardStats())
                if self._budget.accepting:  # else the budget's resume starts it
                    self._start_accepting(bound)
                log.info(
                    "listening forward_id=%s socket_path=%s mode=%04o uid=%d gid=%d",
                    escape(bound.forward_id),
                    escape(bound.path),
                    bound.mode,
                    bound.uid,
                    bound.gid,
                )

    async def Unbind(
        self, request: pb.UnbindRequest, context: ttrpc.CallContext
    ) -> empty_pb2.Empty:
        async with self._bind_lock:
            for forward_id in request.forward_ids:
                # Stops accepting, removes the file, then the directories Bind made.
                bound = self._bound.remove(forward_id)
                if bound is None:
                    log.info("unbind: not bound forward_id=%s", escape(forward_id))
                    continue
                log.info(
                    "unbound forward_id=%s socket_path=%s",
                    escape(forward_id),
                    escape(bound.path),
                )
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

    def _start_accepting(self, bound: Bound) -> None:
        forward_id = bound.forward_id

        def failed(exc: OSError) -> None:
            # Containers can cause this at will (EMFILE...): the listener backs off.
            self._peer_log.warning(
                "accept_failed",
                "accept failed forward_id=%s socket_path=%s error=%r",
                escape(forward_id),
                escape(bound.path),
                exc,
            )

        bound.listener.start_accepting(
            lambda conn: self._on_connection(forward_id, conn), failed, backoff=_ACCEPT_BACKOFF
        )

    def _pause_accepting(self) -> None:
        # The budget is spent: new connections wait in the kernel's listen backlog.
        for bound in self._bound:
            bound.listener.stop_accepting()
        self._peer_log.warning(
            "budget_spent",
            "connections at their descriptor budget, accepting paused "
            "connections=%d max_connections=%d pending=%d",
            self._budget.connections,
            self._budget.max_connections,
            self._dispatcher.pending,
        )

    def _resume_accepting(self) -> None:
        if self._closed:
            return
        for bound in self._bound:
            if not bound.listener.closed:
                self._start_accepting(bound)
        log.debug("accepting resumed connections=%d", self._budget.connections)

    def _on_connection(self, forward_id: str, conn: socket.socket) -> None:
        p = _Connection(forward_id, conn, _peer_of(conn))
        # The share goes with p.conn: given back where that socket is closed
        # (close_pending) or, once it is relayed, when the relay ends.
        self._budget.take()
        self._stats[forward_id].requests += 1
        log.debug("connection accepted %s", p)
        if self._dispatcher.connection(p):
            self._deadlines.add(p)

    # -- Accept -----------------------------------------------------------------

    async def Accept(self, stream: ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest]) -> None:
        if self._closed:
            raise ttrpc.TtrpcError(ttrpc.Code.UNAVAILABLE, "socketforward: shutting down")
        announced = announced_forward_ids(stream.context.get(FORWARD_IDS_METADATA))
        call = _AcceptCall(
            next(self._call_numbers),
            stream,
            announced,
            pick_prefix=_pick_prefix(stream.context.get(PICK_POOLED_METADATA)),
        )
        peer = stream.context.peer
        log.info(
            "accept stream opened %s forward_ids=%s%s",
            call,
            "-" if announced is None else ",".join(sorted(announced)),
            "" if peer is None else f" pid={peer.pid} uid={peer.uid} gid={peer.gid}",
        )
        # Results are taken as the connection reads them (no task wake per
        # answer); the receiver only waits for the host to close its side.
        stream.deliver(
            functools.partial(self._on_result, call),
            functools.partial(self._undecodable_result, call),
        )
        receiver = asyncio.get_running_loop().create_task(stream.recv())
        how = "ended"
        try:
            self._dispatcher.add_call(call)
            waiting: set[asyncio.Future[Any]] = {receiver, call.ended}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done and receiver.exception() is not None:
                how = f"failed error={receiver.exception()!r}"
            elif receiver in done:
                how = "closed by the host"
            elif call.ended.result() is not None:
                how = f"failed error={call.ended.result()!r}"
            else:
                how = "ended by shutdown"
        except asyncio.CancelledError:
            how = "cancelled (rpc connection lost)"
            raise
        finally:
            receiver.cancel()
            # End the call before awaiting anything: a second cancellation (the
            # RPC connection dropping right after the host closed this call)
            # would otherwise skip it and strand its requests for good.
            call.live = False
            handed_back = self._dispatcher.end_call(call)
            log.info("accept stream %s %s handed_back=%d", how, call, handed_back)
            await asyncio.gather(receiver, return_exceptions=True)

    async def accept(self, stream: ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest]) -> None:
        """Python spelling of :meth:`Accept`."""
        await self.Accept(stream)

    def _on_result(self, call: _AcceptCall, result: pb.ConnectResult) -> None:
        if not result.error and (result.ends_channel or result.data_stream_id):
            self._take_answer(call, result)
        self._dispatcher.result(call, result.stream_id, result.error)

    def _undecodable_result(self, call: _AcceptCall, exc: ttrpc.MessageDecodeError) -> None:
        # No stream_id to route it by: only this answer is lost (its connection
        # times out); the call and its other answers go on.
        log.warning(
            "undecodable connect result dropped %s size=%d error=%r",
            call,
            len(exc.data),
            str(exc)[:256],
        )

    def _take_answer(self, call: _AcceptCall, result: pb.ConnectResult) -> None:
        """The extensions of a successful answer: its ends channel (5.5) and the
        pooled data stream it names (5.6)."""
        pooled = result.data_stream_id
        if pooled and not (valid_stream_id(pooled) and pooled.startswith(POOLED_PREFIX)):
            self._peer_log.warning(
                "bad_data_stream",
                "connect result names no pooled stream stream_id=%s data_stream_id=%s",
                escape(result.stream_id),
                escape(pooled[:256]),
            )
            pooled = ""
        p = call.unanswered.get(result.stream_id)
        if p is not None:
            p.ends_channel = result.ends_channel
            p.data_stream_id = pooled
        elif pooled:  # the connection is gone: end the host's relay on it
            self.drop_stream(pooled)

    # -- StreamEnds (docs/protocol.md 5.5) ----------------------------------------------

    async def StreamEnds(self, stream: ttrpc.ServerStream[pb.StreamEnd, pb.StreamEnd]) -> None:
        if self._closed:
            raise ttrpc.TtrpcError(ttrpc.Code.UNAVAILABLE, "socketforward: shutting down")
        channel = next(self._call_numbers)
        # The hello: the host names this call in the answers whose ends it carries.
        limit = 0 if self._pooled is None else self._pooled.max_pooled
        await stream.send(pb.StreamEnd(channel=channel, pool_limit=limit, pick_pooled=bool(limit)))
        self._ends_calls[channel] = stream
        log.info("stream ends call opened channel=%d", channel)
        try:
            while (end := await stream.recv()) is not None:
                if not valid_stream_id(end.stream_id):
                    self._peer_log.warning(
                        "bad_stream_end",
                        "stream end with an invalid stream id dropped channel=%d stream_id=%s",
                        channel,
                        escape(end.stream_id[:256]),
                    )
                    continue
                if not self._ends.received(end.stream_id, end.bytes):
                    log.debug("stream end before its relay kept stream_id=%s", end.stream_id)
        finally:
            del self._ends_calls[channel]
            if not self._ends_calls and self._pooled is not None:
                # The host's pool went with the call (5.6): answers naming one are lost too.
                self._pooled.drop_pooled()
            relays = self._ends.channel_lost(channel)
            log.info("stream ends call closed channel=%d relays=%d", channel, relays)

    # -- Dial: the expose direction (docs/protocol.md 4.10) -----------------------------

    # A plain function, not async def: the ttrpc server calls it as the request is
    # read, so the usual Dial (stream registered, socket accepting) costs no task.
    def Dial(  # type: ignore[override]
        self, request: pb.DialRequest, context: ttrpc.CallContext
    ) -> empty_pb2.Empty | asyncio.Task[empty_pb2.Empty]:
        if self._closed:
            raise ttrpc.TtrpcError(ttrpc.Code.UNAVAILABLE, "socketforward: shutting down")
        stream_id, expose_id, path = request.stream_id, request.expose_id, request.socket_path
        what = _Dialed(stream_id, expose_id, path)
        try:
            self._check_dial(stream_id, path)
        except ttrpc.TtrpcError as exc:
            self._dial_failed(what, exc)
            self.drop_stream(stream_id)  # opened for this Dial: nobody will claim it
            raise
        stats = self._expose_stats.setdefault(expose_id, ForwardStats())
        stats.requests += 1
        if self._budget.connections >= self._budget.max_connections:
            spent = ttrpc.TtrpcError(
                ttrpc.Code.RESOURCE_EXHAUSTED,
                f"socketforward: connections at their budget ({self._budget.max_connections})",
            )
            stats.fail("budget")
            self._dial_failed(what, spent)
            self.drop_stream(stream_id)
            raise spent
        self._budget.take()  # given back by the relay, or on failure
        # The host opens the data stream before it asks: usually registered already.
        try:
            data = self._streams.get(stream_id)
        except LookupError:
            return self._dial_later(_DialWait(what, request, stats, None, self._budget.give_back))
        try:
            conn = transport.connect_unix_now(path)
        except OSError as exc:  # no socket to be had (EMFILE...): waiting would not help
            self._dial_refused(what, stats, _dial_error(path, exc), data)
        if conn is None:
            return self._dial_later(_DialWait(what, request, stats, data, self._budget.give_back))
        self._run_relay(what, stream_id, conn, data, stats, ends_channel=request.ends_channel)
        return empty_pb2.Empty()

    def _dial_later(self, wait: _DialWait) -> asyncio.Task[empty_pb2.Empty]:
        """The rest of a Dial that must wait (for its data stream or the VM
        socket), in a task of ours that the ttrpc server awaits."""
        task = asyncio.get_running_loop().create_task(self._dial_waiting(wait))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(wait.task_done)
        return task

    async def _dial_waiting(self, wait: _DialWait) -> empty_pb2.Empty:
        data, what, stats = wait.take(), wait.what, wait.stats
        stream_id, path = wait.request.stream_id, wait.request.socket_path
        conn: socket.socket | None = None
        try:
            if data is None:
                data = await self._claim_stream(stream_id)
            conn = await self._dial(path)
        except ttrpc.TtrpcError as exc:
            self._dial_refused(what, stats, exc, data, conn)
        except BaseException:
            for sock in (conn, data):
                if sock is not None:
                    sock.close()
            self._budget.give_back()
            raise
        self._run_relay(what, stream_id, conn, data, stats, ends_channel=wait.request.ends_channel)
        return empty_pb2.Empty()

    def _dial_refused(
        self,
        what: _Dialed,
        stats: ForwardStats,
        exc: ttrpc.TtrpcError,
        *socks: socket.socket | None,
    ) -> NoReturn:
        """Close what a Dial opened, give its budget share back, count, log, raise *exc*."""
        for sock in socks:
            if sock is not None:
                sock.close()
        self._budget.give_back()
        reason = _DIAL_REASONS.get(exc.code) if isinstance(exc.code, ttrpc.Code) else None
        stats.fail(reason or "dial")
        self._dial_failed(what, exc)
        raise exc

    def _check_dial(self, stream_id: str, path: str) -> None:
        if not valid_stream_id(stream_id):
            raise ttrpc.TtrpcError(ttrpc.Code.INVALID_ARGUMENT, "socketforward: invalid stream ID")
        problem = transport.unix_path_problem(path)
        if problem is not None:
            raise ttrpc.TtrpcError(
                ttrpc.Code.INVALID_ARGUMENT, f"socketforward: socket path {path!r} {problem}"
            )
        if self._expose_allow is not None and not any(
            fnmatch.fnmatchcase(path, pattern) for pattern in self._expose_allow
        ):
            raise ttrpc.TtrpcError(
                ttrpc.Code.PERMISSION_DENIED,
                f"socketforward: socket path {path!r} is not allowed here (--expose-allow)",
            )

    async def _claim_stream(self, stream_id: str) -> socket.socket:
        # The host opens the data stream before it asks: usually here already.
        try:
            return self._streams.get(stream_id)
        except LookupError:
            pass
        try:
            return await self._streams.wait_for(stream_id, self._stream_wait)
        except LookupError as exc:
            raise ttrpc.TtrpcError(
                ttrpc.Code.NOT_FOUND, f"socketforward: no data stream {stream_id!r}: {exc}"
            ) from None

    async def _dial(self, path: str) -> socket.socket:
        """Connect to the VM socket *path*; a TtrpcError whose code says why not."""
        try:
            # A UNIX connect is usually done at once: no timer.
            now = transport.connect_unix_now(path)
            if now is not None:
                return now
            return await transport.connect(transport.UnixEndpoint(path), timeout=self._dial_timeout)
        except TimeoutError:
            raise ttrpc.TtrpcError(
                ttrpc.Code.DEADLINE_EXCEEDED,
                f"socketforward: dial {path!r}: no answer within {self._dial_timeout:g}s",
            ) from None
        except OSError as exc:
            raise _dial_error(path, exc) from None

    def _dial_failed(self, what: _Dialed, exc: ttrpc.TtrpcError) -> None:
        # The host asks for these at will: rate-limited, ids escaped.
        code = exc.code.name if isinstance(exc.code, ttrpc.Code) else exc.code
        self._peer_log.warning(
            "dial_failed", "dial failed %s code=%s error=%r", what, code, exc.message
        )

    # -- the dispatcher's sink ----------------------------------------------------

    def send_request(self, call: _AcceptCall, pending: _Connection) -> bool:
        # No task per call: the window of unanswered requests bounds what can
        # pile up in the transport.
        picked = None
        if call.pick_prefix and self._pooled is not None and call.serves(pending.forward_id):
            picked = self._pooled.take_pooled(call.pick_prefix)
        request = pb.ConnectRequest(stream_id=pending.stream_id, forward_id=pending.forward_id)
        if picked is not None:
            request.data_stream_id = picked[0]
        try:
            call.stream.send_nowait(request)
        except (ttrpc.TtrpcError, ttrpc.StreamClosedError) as exc:
            call.end(exc)
            if picked is not None:
                picked[1].close()
            return False
        if picked is not None:
            # Relay at once (5.6): the connection's first bytes cross with the
            # request, not after the answer; the answer says whether it stays.
            self._relay_early(pending, *picked)
        return True

    def close_pending(self, pending: _Connection, reason: Failure, detail: str) -> None:
        self._deadlines.discard(pending)
        if pending.relay is not None:
            pending.relay.close()  # its end gives back the share
            pending.relay = None
        if pending.conn is not None:
            pending.conn.close()
            pending.conn = None
            self._budget.give_back()
        self._stats.setdefault(pending.forward_id, ForwardStats()).fail(reason.value)
        self._peer_log.warning(
            reason.value,
            "connection closed %s reason=%s detail=%r",
            pending,
            reason.value,
            detail,
        )

    def claim(self, pending: _Connection) -> bool:
        if pending.relay is not None:
            # Unanswered, but relaying on the stream the guest picked: whether
            # the host relays it too, the stream tells (its ends as shutdowns).
            self._settle_early(pending, 0)
            return True
        try:
            data = self._streams.get(pending.data_stream)
        except LookupError:
            return False
        self._relay(pending, data)
        return True

    def wanted(self, pending: _Connection) -> bool:
        # POLLHUP: the container closed (a half-close alone is POLLRDHUP: still wanted).
        conn = pending.conn
        if conn is None:
            return False
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return not any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    def drop_stream(self, stream_id: str) -> None:
        # The host opened a data stream nobody will claim now: close it.
        with contextlib.suppress(LookupError):
            self._streams.get(stream_id).close()

    def start_relay(self, pending: _Connection) -> None:
        self._deadlines.discard(pending)
        if pending.relay is not None:
            self._settle_early(pending, pending.ends_channel)
            return
        if pending.conn is None:
            return  # relayed early on a stream it picked, and that relay has ended
        # The host opens the data stream before answering, so it is usually
        # registered already: no task needed to wait for it.
        try:
            data = self._streams.get(pending.data_stream)
        except LookupError:
            task = asyncio.get_running_loop().create_task(self._claim_and_relay(pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._relay(pending, data)

    # -- relaying ----------------------------------------------------------------

    async def _claim_and_relay(self, p: _Connection) -> None:
        try:
            data = await self._streams.wait_for(p.data_stream, self._stream_wait)
        except Exception as exc:
            # LookupError: the host said success but no data stream came.
            self.close_pending(p, Failure.NO_STREAM, str(exc))
            return
        except BaseException:
            self.close_pending(p, Failure.SHUTDOWN, "service shutting down")
            raise
        self._relay(p, data)

    def _relay(self, p: _Connection, data: socket.socket) -> None:
        """Relay a container connection on callbacks, no task: an idle connection
        costs only its relay."""
        self._deadlines.discard(p)
        conn, p.conn = p.conn, None
        if conn is None:
            data.close()
            return
        stats = self._stats.setdefault(p.forward_id, ForwardStats())
        self._run_relay(p, p.stream_id, conn, data, stats, ends_channel=p.ends_channel)

    def _relay_early(self, p: _Connection, pool_id: str, data: socket.socket) -> None:
        """Relay *p* on the pooled stream *pool_id* before the host answers; the
        answer's deadline stays."""
        conn, p.conn = p.conn, None
        if conn is None:
            data.close()
            return
        p.data_stream_id = pool_id
        stats = self._stats.setdefault(p.forward_id, ForwardStats())
        p.relay = self._run_relay(p, p.stream_id, conn, data, stats, ends_channel=0, early=True)

    def _settle_early(self, p: _Connection, ends_channel: int) -> None:
        """*p*'s early relay stays: count it, and let its ends travel on
        *ends_channel* (0: as shutdowns)."""
        running, p.relay = p.relay, None
        assert running is not None
        if running.closed:
            return
        self._stats.setdefault(p.forward_id, ForwardStats()).connected += 1
        channel = ends_channel if ends_channel in self._ends_calls else 0
        if channel:
            self._ends.add(running)
        running.settle_ends(self._ends if channel else None, channel)

    def _run_relay(
        self,
        what: object,
        stream_id: str,
        conn: socket.socket,
        data: socket.socket,
        stats: ForwardStats,
        *,
        ends_channel: int,
        early: bool = False,
    ) -> relay.Relay | None:
        """Relay *conn* (in the VM) and the data stream *data*; *conn* holds a
        budget share, given back when the relay ends. *what* names the
        connection in the log. *early*: before the host's answer, which
        settles it (counted connected then; its a -> b end held till then).
        Returns the relay, None when it ended at once."""
        if not early:
            stats.connected += 1
        stats.active += 1
        log.debug("relaying %s", what)
        done = _RelayDone(self, what, stats, early=early)
        channel = ends_channel if ends_channel in self._ends_calls else 0
        try:
            running = relay.Relay(
                conn,
                data,
                pipes=self._pipes,
                on_done=done,
                ends=self._ends if channel else None,
                ends_id=stream_id,
                ends_channel=channel,
                ends_later=early,
            )
        except BaseException:
            conn.close()
            data.close()
            stats.active -= 1
            self._budget.give_back()
            raise
        done.running = running
        self._relays.add(running)
        with contextlib.suppress(Exception):  # on_done has logged it; sockets are closed
            running.start()
            if channel and not running.closed:
                self._ends.add(running)
        return None if running.closed else running

    def relay_done(self, done: _RelayDone, result: relay.RelayStats) -> None:
        """A relay ended, both sockets closed: give back the share its VM-side
        socket held, count it, forget it."""
        running, stats, what = done.running, done.stats, done.what
        assert running is not None
        self._budget.give_back()
        self._relays.discard(running)
        if running.ends_channel:  # set at the start, or once an early relay was settled
            self._ends.discard(running)
        stats.active -= 1
        if not (done.early and isinstance(what, _Connection) and what.state is State.FAILED):
            # (bytes of a connection the host refused went nowhere)
            stats.bytes_to_host += result.bytes_a_to_b
            stats.bytes_to_vm += result.bytes_b_to_a
        if result.ended == "cancelled":
            log.debug("connection ended by shutdown %s", what)
            return
        log.debug(
            "connection done %s ended=%s to_host=%d from_host=%d duration=%.3f%s",
            what,
            result.ended,
            result.bytes_a_to_b,
            result.bytes_b_to_a,
            result.duration,
            f" error={result.error!r}" if result.error else "",
        )
