"""The :class:`Forwarder`: the host side for one VM (docs/protocol.md
1.4, 4.3-4.5, 4.9).

On each RPC connection it Binds every forward, then holds an Accept call
announcing its forward_ids and hands each ConnectRequest read from it to
:mod:`socketforward.host.connect`. The table may change while it runs
(:meth:`Forwarder.add`, :meth:`Forwarder.remove`): the guest is told (Bind,
Unbind). A guest that routes by announced forward_ids (ours) then gets a new
Accept call announcing the new table, and the old one is retired once its
requests are answered; any other guest (nerdbox's) keeps its one call, since
it would go on handing the old call requests nobody answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Final

import ttrpc_asyncio as ttrpc
from socketforward import transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardStub
from socketforward.deadlines import Deadlines
from socketforward.host.connect import Connector, ConnectRequest, default_max_relays
from socketforward.host.expose import Exposer
from socketforward.host.forwards import Expose, Forward
from socketforward.host.pool import DEFAULT_POOL_SIZE, PoolStats
from socketforward.logs import escape
from socketforward.protocol import FORWARD_IDS_METADATA, PICK_POOLED_METADATA
from socketforward.stats import ForwardStats

__all__ = ["MAX_QUEUED_TO_VM", "VM_READ_TIMEOUT", "AcceptCall", "Forwarder"]

log = logging.getLogger("socketforward.host")

_BACKOFF_MIN: Final = 0.05
_RETIRE_TIMEOUT: Final = 30.0
MAX_QUEUED_TO_VM: Final = 1 << 20
"""Bytes queued toward the VM on the RPC connection past which ConnectRequests are not read."""
VM_READ_TIMEOUT: Final = 30.0
"""How long the VM may leave that queue unread before its RPC connection is dropped."""


def _socket(forward: Forward) -> pb.Socket:
    """A forward as Bind sends it: ids and the VM path; mode and owner only when
    configured (nerdbox's guest skips them; ours then applies its defaults)."""
    sock = pb.Socket(forward_id=forward.forward_id, socket_path=forward.vm_path)
    if forward.mode is not None:
        sock.mode = forward.mode
    if forward.uid is not None:
        sock.uid = forward.uid
    if forward.gid is not None:
        sock.gid = forward.gid
    return sock


class AcceptCall:
    """One Accept call (the ttrpc stream of ConnectRequests and their results,
    not a data stream) and the requests read from it still being answered."""

    def __init__(
        self, stream: ttrpc.ClientStream[pb.ConnectResult, pb.ConnectRequest], announced: int
    ) -> None:
        self.stream = stream
        self.announced = announced
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.closing = False
        """Retiring: its send side is closed, so requests still arriving cannot be answered."""

    def send_result(self, result: pb.ConnectResult) -> None:
        self.stream.send_nowait(result)

    def begin(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


class _Session:
    """One RPC connection to the guest and what lives only as long as it: its
    tasks, and the fast-path ConnectRequests awaiting their ack."""

    def __init__(self, client: ttrpc.Client, ack_timeout: float) -> None:
        self.client = client
        self.stub = SocketForwardStub(client)
        self.refresh = asyncio.Event()
        self.ready = False
        self.routes_by_ids = True
        """The guest routes requests by announced forward_ids and requeues a
        closed call's unanswered ones (ours): a table change rotates the call."""
        self.tasks: set[asyncio.Task[Any]] = set()
        self.acks: Deadlines[ConnectRequest] = Deadlines(ack_timeout, ConnectRequest.ack_timed_out)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        for connect in self.acks.drain():
            connect.abandon()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()


class Forwarder:
    """The host side for one VM.

    Give it RPC connections with :meth:`serve` (one at a time; a new one
    replaces the old), or let :meth:`run_listening` / :meth:`run_dialing` get
    them. Relays outlive the RPC connection they were set up on; :meth:`close`
    ends everything.
    """

    def __init__(
        self,
        forwards: Iterable[Forward],
        streams_endpoint: transport.Endpoint,
        *,
        dial_timeout: float = 5.0,
        stream_timeout: float = 10.0,
        stream_retry_for: float = 30.0,
        rpc_timeout: float = 10.0,
        max_pending: int = 1024,
        max_relays: int | None = None,
        streams_uid: int | None = None,
        max_queued_to_vm: int = MAX_QUEUED_TO_VM,
        vm_read_timeout: float = VM_READ_TIMEOUT,
        stream_pool: int = DEFAULT_POOL_SIZE,
    ) -> None:
        """*max_relays*: connections (relays and requests being answered) the VM
        may hold at once; more are refused ``too many pending connections``
        (reason ``relays_full``). None: derived from the fd limit.

        *streams_uid*: the user the data-stream listener must run as (SO_PEERCRED
        of ``unix:`` and ``hvsock:`` endpoints); None means this process's own.

        *max_queued_to_vm*: once more bytes than this wait to be read by the VM
        on the RPC connection, the host stops reading ConnectRequests until the
        queue is down to a quarter; if that takes over *vm_read_timeout* seconds
        the RPC connection is dropped (the guest redials; relays go on).

        *stream_pool*: data streams kept open ahead of demand while the guest
        takes them (docs/protocol.md 5.6); 0 opens each one on demand."""
        if max_queued_to_vm <= 0 or vm_read_timeout <= 0:
            raise ValueError("max_queued_to_vm and vm_read_timeout must be positive")
        self.max_queued_to_vm = max_queued_to_vm
        self.vm_read_timeout = vm_read_timeout
        self._forwards: dict[str, Forward] = {}
        for forward in forwards:
            self._check_new(forward, self._forwards)
            self._forwards[forward.forward_id] = forward
        self._stats = {fid: ForwardStats() for fid in self._forwards}
        self.streams_endpoint = streams_endpoint
        self.rpc_timeout = rpc_timeout
        self._connector = Connector(
            self._forwards,
            self._stats,
            streams_endpoint,
            dial_timeout=dial_timeout,
            stream_timeout=stream_timeout,
            stream_retry_for=stream_retry_for,
            max_pending=max_pending,
            max_relays=default_max_relays() if max_relays is None else max_relays,
            streams_uid=streams_uid,
            stream_pool=stream_pool,
        )
        self._exposer = Exposer(self._connector, self._current, rpc_timeout=rpc_timeout)
        self._undecodable = 0
        self._unread_drops = 0
        self.sessions = 0
        """RPC connections that got as far as an open Accept call."""
        self._session: _Session | None = None
        self._ready = asyncio.Event()
        self._down = asyncio.Event()  # set while no RPC connection got as far as Accept
        self._down.set()
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def dial_timeout(self) -> float:
        return self._connector.dial_timeout

    @property
    def stream_timeout(self) -> float:
        return self._connector.stream_timeout

    @property
    def stream_retry_for(self) -> float:
        return self._connector.stream_retry_for

    @property
    def max_pending(self) -> int:
        return self._connector.max_pending

    @property
    def max_relays(self) -> int:
        return self._connector.max_relays

    @property
    def streams_uid(self) -> int:
        """The user the data-stream listener must run as."""
        return self._connector.streams_uid

    @property
    def unknown_requests(self) -> int:
        """ConnectRequests naming a forward_id not in the table (rejected, never dialed)."""
        return self._connector.unknown_requests

    @property
    def undecodable_requests(self) -> int:
        """ConnectRequests that did not decode (e.g. a string field that is not
        UTF-8): dropped, nothing to answer them by."""
        return self._undecodable

    @property
    def exposes(self) -> Mapping[str, Expose]:
        """The exposes (VM sockets reached from the host) listened for now."""
        return self._exposer.exposes

    async def add_exposes(self, exposes: Iterable[Expose]) -> None:
        """Listen for *exposes* (docs/protocol.md 4.10), all or none; ValueError
        names what cannot be used."""
        if self._closed:
            raise RuntimeError("Forwarder is closed")
        await self._exposer.add(exposes)

    def remove_exposes(self, expose_ids: Iterable[str]) -> list[str]:
        """Stop listening for *expose_ids*; running connections go on. Returns
        the ids that were there."""
        return self._exposer.remove(expose_ids)

    def expose_stats(self) -> dict[str, ForwardStats]:
        """Counts per expose_id (copies)."""
        return {k: v.copy() for k, v in self._exposer.stats.items()}

    @property
    def stray_ends(self) -> int:
        """StreamEnd messages from the VM for no relay of ours, dropped (docs/protocol.md 5.5)."""
        return self._connector.ends.strays

    def pool_stats(self) -> PoolStats:
        """The pool of data streams opened ahead of demand (docs/protocol.md 5.6)."""
        return self._connector.pool.stats()

    @property
    def pending(self) -> int:
        """ConnectRequests admitted and not answered yet (bounded by max_pending)."""
        return self._connector.pending

    @property
    def queued_to_vm(self) -> int:
        """Bytes the current RPC connection holds for the VM to read (0 when none);
        past max_queued_to_vm no ConnectRequest is read."""
        session = self._current()
        return 0 if session is None else session.client.write_buffer_size

    @property
    def unread_drops(self) -> int:
        """RPC connections dropped because the VM left max_queued_to_vm bytes
        unread for vm_read_timeout."""
        return self._unread_drops

    # -- the table ----------------------------------------------------------

    @property
    def forwards(self) -> Mapping[str, Forward]:
        return dict(self._forwards)

    @staticmethod
    def _check_new(forward: Forward, table: Mapping[str, Forward]) -> bool:
        """True when *forward* is new; False when the identical entry is there."""
        existing = table.get(forward.forward_id)
        if existing is None:
            return True
        if existing == forward:
            return False
        raise ValueError(f"forward ID {forward.forward_id} is already used by another forward")

    async def add(self, forwards: Iterable[Forward]) -> None:
        """Add forwards; Bind them now when a guest is connected (else on connect).

        Identical entries are no-ops; a forward_id with other paths is a
        ValueError. A Bind the guest refuses raises its TtrpcError and adds nothing.
        """
        async with self._lock:
            new: dict[str, Forward] = {}
            for forward in forwards:
                if self._check_new(forward, self._forwards) and self._check_new(forward, new):
                    new[forward.forward_id] = forward
            if not new:
                return
            session = self._current()
            if session is not None:
                try:
                    await self._bind_call(session, list(new.values()))
                except ttrpc.TtrpcError as exc:
                    if exc.code != ttrpc.Code.UNAVAILABLE:
                        raise
                    # The connection is going away: the next one Binds everything.
            self._forwards.update(new)
            for fid in new:
                self._stats.setdefault(fid, ForwardStats())
            log.info("forwards added forward_ids=%s", ",".join(new))
            if session is not None:
                session.refresh.set()

    async def replace(self, forwards: Iterable[Forward]) -> None:
        """Give forwards already in the table another mode or owner (same id and
        paths): Bind again, which our guest applies to the socket in place (the
        listener and its connections stay; docs/protocol.md 4.3). ValueError
        for an id not in the table or with other paths; a Bind the guest
        refuses raises its TtrpcError and changes nothing."""
        async with self._lock:
            changed: dict[str, Forward] = {}
            for forward in forwards:
                old = self._forwards.get(forward.forward_id)
                if old is None or (old.host_path, old.vm_path) != (
                    forward.host_path,
                    forward.vm_path,
                ):
                    raise ValueError(
                        f"forward ID {forward.forward_id}: only mode and owner change in place"
                    )
                if old != forward:
                    changed[forward.forward_id] = forward
            if not changed:
                return
            session = self._current()
            if session is not None:
                try:
                    await self._bind_call(session, list(changed.values()))
                except ttrpc.TtrpcError as exc:
                    if exc.code != ttrpc.Code.UNAVAILABLE:
                        raise
            self._forwards.update(changed)
            log.info("forwards changed in place forward_ids=%s", ",".join(changed))

    async def remove(self, forward_ids: Iterable[str]) -> None:
        """Remove forwards: their ConnectRequests are refused from now on, and the
        guest is asked to Unbind them (a guest without Unbind is tolerated).
        Relays already running are left alone."""
        async with self._lock:
            ids = []
            for fid in forward_ids:
                if self._forwards.pop(fid, None) is None:
                    log.info("remove: no such forward forward_id=%s", escape(fid))
                else:
                    ids.append(fid)
            if not ids:
                return
            log.info("forwards removed forward_ids=%s", ",".join(ids))
            session = self._current()
            if session is None:
                return
            session.refresh.set()
            try:
                await session.stub.Unbind(
                    pb.UnbindRequest(forward_ids=ids), timeout=self.rpc_timeout
                )
            except ttrpc.TtrpcError as exc:
                if exc.code == ttrpc.Code.UNIMPLEMENTED:
                    log.warning(
                        "guest does not implement Unbind; its listeners stay, connections "
                        "to them are refused forward_ids=%s",
                        ",".join(ids),
                    )
                else:
                    log.warning("unbind failed forward_ids=%s error=%r", ",".join(ids), str(exc))
            else:
                log.info("unbound forward_ids=%s", ",".join(ids))

    # -- stats ----------------------------------------------------------------

    def stats(self) -> dict[str, ForwardStats]:
        """A snapshot per forward_id (forwards removed since keep their figures)."""
        snapshot = {fid: s.copy() for fid, s in self._stats.items()}
        for running, fid in self._connector.relays.items():
            snapshot[fid].bytes_to_vm += running.stats.bytes_a_to_b
            snapshot[fid].bytes_to_host += running.stats.bytes_b_to_a
        return snapshot

    @property
    def connected(self) -> bool:
        return self._current() is not None

    async def wait_disconnected(self) -> None:
        """Return once no RPC connection with an Accept call is being served
        (at once when there is none)."""
        await self._down.wait()

    async def wait_ready(self) -> None:
        """Return once a guest is connected, bound and an Accept call is open."""
        await self._ready.wait()

    # -- RPC connections --------------------------------------------------------

    def _current(self) -> _Session | None:
        session = self._session
        if session is None or session.client.closed:
            return None
        return session

    async def serve(self, sock: socket.socket) -> None:
        """Run over one RPC connection (dialed or accepted; owned from here) until
        it closes: Bind every forward, then hold Accept and answer ConnectRequests."""
        if self._closed:
            sock.close()
            raise RuntimeError("Forwarder is closed")
        try:
            client = await ttrpc.Client.connect(sock)
        except OSError as exc:
            log.warning("rpc connection failed error=%r", exc)
            return
        # Writers pause past the mark and resume at a quarter of it: drain() waits for that.
        client.set_write_buffer_limits(self.max_queued_to_vm)
        session = _Session(client, self._connector.stream_timeout)
        previous, self._session = self._session, session
        try:
            if previous is not None:
                log.warning("new rpc connection replaces the current one")
                await previous.client.close()
            log.info(
                "rpc connected streams=%s forwards=%d", self.streams_endpoint, len(self._forwards)
            )
            async with self._lock:
                await self._bind_all(session)
            session.routes_by_ids = await self._probe_routing(session)
            if session.routes_by_ids:
                # Our guest: ends of data-stream directions can travel out of band.
                await self._open_stream_ends(session)
            accept = session.spawn(self._accept_calls(session))
            closed = session.spawn(client.wait_closed())
            await asyncio.wait({accept, closed}, return_when=asyncio.FIRST_COMPLETED)
        except ttrpc.TtrpcError as exc:
            if exc.code != ttrpc.Code.UNAVAILABLE:
                raise
        finally:
            if self._session is session:
                self._session = None
                self._ready.clear()
                self._down.set()
            await session.close()
            log.info("rpc connection closed")

    async def _bind_call(self, session: _Session, forwards: list[Forward]) -> None:
        request = pb.BindRequest(sockets=[_socket(f) for f in forwards])
        await session.stub.Bind(request, timeout=self.rpc_timeout)
        log.info(
            "bound forward_ids=%s count=%d",
            ",".join(f.forward_id for f in forwards),
            len(forwards),
        )

    async def _bind_all(self, session: _Session) -> None:
        """Bind the table (idempotent in the guest). Bind is all-or-nothing, so
        when the guest refuses the whole set, each forward is tried on its own:
        one bad entry does not take the others down."""
        forwards = list(self._forwards.values())
        if not forwards:
            return
        try:
            await self._bind_call(session, forwards)
            return
        except ttrpc.TtrpcError as exc:
            if exc.code == ttrpc.Code.UNAVAILABLE:
                raise
            log.error("bind failed count=%d error=%r", len(forwards), str(exc))
            if len(forwards) == 1:
                return
        for forward in forwards:
            try:
                await self._bind_call(session, [forward])
            except ttrpc.TtrpcError as exc:
                if exc.code == ttrpc.Code.UNAVAILABLE:
                    raise
                log.error("bind failed forward_id=%s error=%r", forward.forward_id, str(exc))

    async def _probe_routing(self, session: _Session) -> bool:
        """Tell the guests apart by what they do, once per RPC connection: our
        guest answers an Unbind of nothing OK (and does nothing); nerdbox's
        serves only Bind and Accept, so its ttrpc answers UNIMPLEMENTED."""
        extra = ""
        try:
            await session.stub.Unbind(pb.UnbindRequest(forward_ids=[]), timeout=self.rpc_timeout)
            routes = True
        except ttrpc.TtrpcError as exc:
            if exc.code == ttrpc.Code.UNAVAILABLE:
                raise
            # Any other error still means Unbind exists (nerdbox's is UNIMPLEMENTED at once).
            routes = exc.code != ttrpc.Code.UNIMPLEMENTED
            if routes:
                extra = f" probe_error={str(exc)!r}"
        log.info("guest routes by announced forward ids: %s%s", "yes" if routes else "no", extra)
        return routes

    async def _open_stream_ends(self, session: _Session) -> None:
        """Open the StreamEnds call (docs/protocol.md 5.5) and wait for the guest's
        hello, before any Accept call, so that every relay can take its ends
        out of band; then read the guest's ends in a task of the session."""
        try:
            call = await session.stub.StreamEnds()
        except (ttrpc.TtrpcError, ttrpc.ProtocolError) as exc:
            log.info("stream ends call not opened, ends go as shutdowns error=%r", str(exc))
            return
        try:
            async with asyncio.timeout(self.rpc_timeout):
                hello = await call.recv()
        except ttrpc.TtrpcError as exc:
            await call.aclose()
            if exc.code == ttrpc.Code.UNAVAILABLE:
                raise
            if exc.code == ttrpc.Code.UNIMPLEMENTED:  # a guest of ours from before it
                log.info("guest takes no stream ends out of band, ends go as shutdowns")
            else:
                log.warning("stream ends call failed, ends go as shutdowns error=%r", str(exc))
            return
        except (TimeoutError, ttrpc.ProtocolError) as exc:
            await call.aclose()
            log.warning("stream ends call: no hello, ends go as shutdowns error=%r", exc)
            return
        if hello is None or hello.stream_id or not hello.channel:
            await call.aclose()
            log.warning("stream ends call without a hello, ends go as shutdowns")
            return
        self._connector.ends_opened(
            hello.channel, call, hello.pool_limit, guest_picks=hello.pick_pooled
        )
        log.info(
            "stream ends call open channel=%d pool_limit=%d pick_pooled=%s",
            hello.channel,
            hello.pool_limit,
            hello.pick_pooled,
        )
        session.spawn(self._read_stream_ends(session, call, hello.channel))

    async def _read_stream_ends(
        self,
        session: _Session,
        call: ttrpc.ClientStream[pb.StreamEnd, pb.StreamEnd],
        channel: int,
    ) -> None:
        """Hand each of the guest's ends to its relay until the call ends; then
        the relays on it fall back to shutdowns."""
        connector = self._connector
        try:
            while True:
                try:
                    end = await call.recv()
                except ttrpc.MessageDecodeError as exc:
                    connector.peer_log.warning(
                        "undecodable_end",
                        "undecodable stream end dropped size=%d error=%r",
                        len(exc.data),
                        str(exc)[:256],
                    )
                    continue
                if end is None:
                    break
                connector.end_received(end)
        except (ttrpc.TtrpcError, ttrpc.ProtocolError) as exc:
            if not session.client.closed:
                log.warning("stream ends call failed channel=%d error=%r", channel, str(exc))
        finally:
            connector.ends_closed(channel)
            with contextlib.suppress(Exception):
                await call.aclose()

    # -- the Accept call -----------------------------------------------------------

    async def _accept_calls(self, session: _Session) -> None:
        """Keep one Accept call open announcing the current table; reopen it
        when the guest ends it, and replace it when the table changes and the
        guest routes by announced forward_ids."""
        backoff = transport.Backoff(_BACKOFF_MIN, 5.0)
        while not session.client.closed:
            session.refresh.clear()
            announced = ",".join(sorted(self._forwards))
            try:
                stream = await session.stub.Accept(
                    metadata={
                        FORWARD_IDS_METADATA: announced,
                        PICK_POOLED_METADATA: self._connector.pool.tag,
                    }
                )
            except ttrpc.TtrpcError as exc:
                if session.client.closed:
                    return
                log.warning("accept open failed error=%r", str(exc))
                await asyncio.sleep(backoff.next())
                continue
            call = AcceptCall(stream, len(self._forwards))
            log.info("accept stream opened announced=%d", call.announced)
            if self._session is session:
                if not session.ready:
                    session.ready = True
                    self.sessions += 1
                self._down.clear()
                self._ready.set()
            reader = session.spawn(self._read_requests(session, call))
            if await self._hold(session, reader):
                session.spawn(self._retire(call, reader))
                backoff.reset()
                continue
            await stream.aclose()
            if session.client.closed:
                return
            self._ready.clear()
            if reader.result():
                backoff.reset()
            log.warning("accept stream ended by the guest; reopening")
            await asyncio.sleep(backoff.next())

    async def _hold(self, session: _Session, reader: asyncio.Task[int]) -> bool:
        """Wait until the guest ends the call *reader* reads (False), or until the
        table changes for a guest that needs the new announcement (True: the
        call is to be replaced).

        A guest that does not route by announced forward_ids (nerdbox's) feeds
        every open Accept call from one queue and never ends the old one, so it
        keeps this call: its requests are answered from the table read live
        (added forwards served, removed ones `unknown forward ID: ...`)."""
        while True:
            refresh = session.spawn(session.refresh.wait())
            try:
                await asyncio.wait({reader, refresh}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                refresh.cancel()
            if reader.done():
                return False
            if session.routes_by_ids:
                return True
            session.refresh.clear()
            log.info(
                "forward table changed, accept stream kept (guest does not route by ids) "
                "forwards=%d",
                len(self._forwards),
            )

    async def _read_requests(self, session: _Session, call: AcceptCall) -> int:
        """Start answering each ConnectRequest as the connection reads it (no task
        wake per request), never waiting on one (the call's receive queue must
        never stall), except while the VM leaves over max_queued_to_vm bytes
        unread; returns how many were read."""
        stream, client = call.stream, session.client
        loop = asyncio.get_running_loop()
        count = 0
        over: asyncio.Future[None] = loop.create_future()

        def on_request(request: pb.ConnectRequest) -> None:
            nonlocal count
            count += 1
            self._answer(session, call, request)
            # Each answer may queue a result toward the VM (send_nowait).
            if client.write_buffer_size > self.max_queued_to_vm and not over.done():
                stream.stop_delivery()  # the rest queue, and the queue pushes back
                over.set_result(None)

        def on_undecodable(exc: ttrpc.MessageDecodeError) -> None:
            # No stream_id to answer by: only this message is lost.
            nonlocal count
            count += 1
            self._undecodable += 1
            self._connector.peer_log.warning(
                "undecodable",
                "undecodable connect request dropped size=%d data=%r error=%r",
                len(exc.data),
                exc.data[:64],
                str(exc)[:256],
            )

        ended = loop.create_task(stream.ended())
        try:
            while True:
                if (
                    client.write_buffer_size > self.max_queued_to_vm
                    and not await self._wait_vm_reading(session)
                ):
                    break
                over = loop.create_future()
                stream.deliver(on_request, on_undecodable)
                await asyncio.wait({over, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not over.done():  # ended while delivering: nothing is left queued
                    ended.result()
                    break
        except (ttrpc.TtrpcError, ttrpc.ProtocolError) as exc:
            if not session.client.closed:
                log.warning("accept stream failed error=%r", str(exc))
        finally:
            if ended.done() and not ended.cancelled():
                ended.exception()  # seen (or logged above): not "never retrieved"
            ended.cancel()
        return count

    def _answer(self, session: _Session, call: AcceptCall, request: pb.ConnectRequest) -> None:
        if call.closing:
            # Our send side is closed: nothing can be answered here. Only a guest
            # that requeues a closed call's requests (ours, 4.8) gets here.
            self._connector.peer_log.warning(
                "closed_call",
                "connect request on a closed accept stream not answered, "
                "left to the guest to requeue stream_id=%s forward_id=%s",
                escape(request.stream_id),
                escape(request.forward_id),
            )
            return
        self._connector.receive(call, request, session.acks, session.spawn)

    async def _wait_vm_reading(self, session: _Session) -> bool:
        """Read no ConnectRequest until the VM has taken most of what is queued for
        it (its own socket then pushes back on it); False when it did not within
        vm_read_timeout, and the RPC connection is being dropped."""
        client = session.client
        queued = client.write_buffer_size
        log.debug("vm not reading, connect requests paused queued=%d", queued)
        # Read nothing at all meanwhile: the VM's own writes then block (else a
        # stream whose queue stays full is closed and its frames read and dropped).
        client.pause_reading()
        try:
            async with asyncio.timeout(self.vm_read_timeout):
                await client.drain()
        except TimeoutError:
            self._unread_drops += 1
            log.warning(
                "vm not reading its rpc connection, connection dropped queued=%d timeout=%gs",
                client.write_buffer_size,
                self.vm_read_timeout,
            )
            await client.close(timeout=0)
            return False
        client.resume_reading()
        return True

    async def _retire(self, old: AcceptCall, reader: asyncio.Task[int]) -> None:
        """End a superseded Accept call once its requests are answered."""
        try:
            await old.idle.wait()
            # Set with the send side's closing (close_send closes it before any await),
            # so the reader drops only what can no longer be answered.
            old.closing = True
            with contextlib.suppress(ttrpc.TtrpcError, ttrpc.ProtocolError):
                await old.stream.close_send()
            # The guest ends its side in answer; bounded in case it never does.
            await asyncio.wait({reader}, timeout=_RETIRE_TIMEOUT)
        finally:
            reader.cancel()
            await old.stream.aclose()

    # -- getting connections --------------------------------------------------------

    async def run_listening(self, listener: transport.Listener) -> None:
        """Accept the guest's RPC dials on *listener* (not owned) and serve each;
        a new dial replaces the current connection (the guest restarted)."""
        current: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    sock = await listener.accept()
                except OSError as exc:
                    log.warning("rpc accept failed endpoint=%s error=%r", listener.endpoint, exc)
                    await asyncio.sleep(0.1)
                    continue
                if current is not None and not current.done():
                    current.cancel()
                    await asyncio.wait({current})
                current = asyncio.get_running_loop().create_task(self._serve_logged(sock))
        finally:
            if current is not None:
                current.cancel()
                await asyncio.wait({current})

    async def run_dialing(
        self,
        endpoint: transport.Endpoint,
        *,
        connect_timeout: float = 5.0,
        backoff_max: float = 5.0,
    ) -> None:
        """Dial the guest's RPC endpoint and serve it; when the connection drops
        or cannot be made, dial again with jittered backoff capped at *backoff_max*."""

        async def serve(sock: socket.socket) -> bool:
            before = self.sessions
            await self._serve_logged(sock)
            return self.sessions != before  # it got as far as an Accept call

        await transport.redial(
            endpoint,
            serve,
            transport.Backoff(_BACKOFF_MIN, backoff_max),
            connect_timeout=connect_timeout,
            log=log,
        )

    async def _serve_logged(self, sock: socket.socket) -> None:
        try:
            await self.serve(sock)
        except Exception:
            log.exception("rpc connection failed")

    async def close(self, drain: float = 0.0) -> None:
        """Drop the RPC connection (no new connections), let running relays
        finish for up to *drain* seconds, then end the rest. Idempotent."""
        self._closed = True
        self._exposer.close()
        session, self._session = self._session, None
        self._ready.clear()
        self._down.set()
        if session is not None:
            await session.close()
        running = len(self._connector.relays)
        if drain > 0 and running:
            log.info("draining relays=%d grace=%gs", running, drain)
            try:
                async with asyncio.timeout(drain):
                    await self._connector.no_relays.wait()
            except TimeoutError:
                log.info("drain over, closing relays=%d", len(self._connector.relays))
        self._connector.close()

    async def __aenter__(self) -> Forwarder:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # control: the current RPC connection's client, to follow when it closes
    @property
    def rpc_client(self) -> ttrpc.Client | None:
        """The ttrpc client of the RPC connection served now (None when none)."""
        session = self._current()
        return None if session is None else session.client
